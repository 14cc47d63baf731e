#!/usr/bin/env python3
"""Writes a `tiny` repo: random deterministic weights in the Hub layout (offline).

    scripts/make_tiny_checkpoint.py --out DIR [--seed N] [--step S] [--if-missing]

With --step the checkpoint is `checkpoint_<S>.safetensors`, as a finetune step.
--if-missing leaves an existing checkpoint alone (scripts/serve uses it for the
finetune that configs/tiny.yaml serves beside `tiny`).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from serve_app import logs
from serve_app.checkpoints import checkpoint_candidates
from serve_app.engine.tiny import write_tiny_repo
from serve_app.engine.variants import get_variant


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step", type=int, default=None)
    parser.add_argument("--if-missing", action="store_true")
    args = parser.parse_args()
    logs.configure()
    existing = args.out / checkpoint_candidates(get_variant("tiny").checkpoint_file, args.step)[0]
    if args.if_missing and existing.is_file():
        print(f"exists: {existing}")
        return 0
    ckpt = write_tiny_repo(args.out, seed=args.seed, step=args.step)
    print(f"wrote {ckpt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
