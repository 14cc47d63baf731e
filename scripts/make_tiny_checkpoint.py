#!/usr/bin/env python3
"""Writes a `tiny` repo: random deterministic weights in the Hub layout (offline).

    scripts/make_tiny_checkpoint.py --out DIR [--seed N] [--step S]

With --step the checkpoint is `checkpoint_<S>.safetensors`, as a finetune step.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from serve_app import logs
from serve_app.engine.tiny import write_tiny_repo


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step", type=int, default=None)
    args = parser.parse_args()
    logs.configure()
    ckpt = write_tiny_repo(args.out, seed=args.seed, step=args.step)
    print(f"wrote {ckpt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
