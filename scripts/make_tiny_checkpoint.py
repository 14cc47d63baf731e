#!/usr/bin/env python3
"""Writes a `tiny` repo: random deterministic weights in the Hub layout (offline).

    scripts/make_tiny_checkpoint.py --out DIR [--seed N] [--step S] [--if-missing]
    scripts/make_tiny_checkpoint.py --for-config CONFIG

With --step the checkpoint is `checkpoint_<S>.safetensors`, as a finetune step.
--if-missing leaves an existing checkpoint alone. --for-config writes the repos a
config's `tiny` variants name and lack (the finetune configs/tiny.yaml serves beside
`tiny`; scripts/serve runs it before `serve run`).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from serve_app import logs
from serve_app.checkpoints import checkpoint_candidates
from serve_app.config import load_app_config, read_config_file
from serve_app.engine.tiny import write_named_repos, write_tiny_repo
from serve_app.engine.variants import get_variant


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", type=pathlib.Path)
    target.add_argument("--for-config", type=pathlib.Path, metavar="CONFIG")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step", type=int, default=None)
    parser.add_argument("--if-missing", action="store_true")
    args = parser.parse_args()
    logs.configure()
    if args.for_config:
        try:
            config = load_app_config(read_config_file(args.for_config)[0])
        except (OSError, ValueError) as e:
            parser.error(f"--for-config: {e}")
        write_named_repos(config.tiny_repos_to_write())
        return 0
    existing = args.out / checkpoint_candidates(get_variant("tiny").checkpoint_file, args.step)[0]
    if args.if_missing and existing.is_file():
        print(f"exists: {existing}")
        return 0
    ckpt = write_tiny_repo(args.out, seed=args.seed, step=args.step)
    print(f"wrote {ckpt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
