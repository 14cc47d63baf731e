#!/usr/bin/env python3
"""Prefill benchmark: what putting a loop into a session's context costs.

    scripts/bench_prefill.py [--variant tiny] [--repeats 3] [--random-weights] [--json out.json]

Two parts, timed on the same machine in one run: encoding the tiled loop context
with the SpectroStream encoder (one jitted call), and teacher-forcing its codes into
a session frame by frame (the engine's batched step with forced rows). Reported per
frame of context and per second of loop audio. Needs a repo with
`resources/spectrostream/encoder.safetensors` (tiny's is made on first use), or
`--random-weights` (the cost does not depend on weight values; a bare GPU box).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np

from serve_app import logs
from serve_app.audio.barclock import BarClock
from serve_app.audio.context import tiled_context
from serve_app.engine import BatchedEngine, Session, load_model
from serve_app.engine.variants import FRAMES_PER_SECOND


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="tiny")
    parser.add_argument("--repo", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    parser.add_argument("--random-weights", action="store_true",
                        help="random model and encoder weights: read no checkpoint files")
    args = parser.parse_args()
    logs.configure()

    loaded = load_model(args.variant, repo=args.repo,
                        random_weights_seed=0 if args.random_weights else None)
    encoder = loaded.audio_encoder()
    frames = loaded.variant.context_frames
    loop = (0.1 * np.random.default_rng(0).standard_normal((4 * 48000, 2))).astype(np.float32)
    context = tiled_context(loop, BarClock(120.0), frames)
    encoder.encode(context)  # compile

    encode_ms, force_ms = [], []
    engine = BatchedEngine(loaded.model, loaded.style, buckets=(1,))
    engine.warmup()
    for i in range(args.repeats):
        t0 = time.perf_counter()
        codes = encoder.encode(context)[-frames:]
        encode_ms.append((time.perf_counter() - t0) * 1000)
        session = Session(loaded.style.embed_text("techno"), seed=i)
        session.prefill(codes)
        engine.add(session)
        t0 = time.perf_counter()
        while session.prefill_pending:
            engine.step()
        force_ms.append((time.perf_counter() - t0) * 1000)
        engine.remove(session.id)

    seconds = frames / FRAMES_PER_SECOND
    enc, force = statistics.median(encode_ms), statistics.median(force_ms)
    result = {
        "variant": args.variant, "context_frames": frames, "context_seconds": seconds,
        "encode_ms": round(enc, 2), "force_ms": round(force, 2),
        "force_ms_per_frame": round(force / frames, 3),
        "prefill_ms_per_second_of_loop": round((enc + force) / seconds, 2),
        "prefill_total_ms": round(enc + force, 2),
    }
    print(f"{args.variant}: context {frames} frames ({seconds:g} s); encode {enc:.1f} ms, "
          f"force {force:.1f} ms ({force / frames:.2f} ms/frame); "
          f"{(enc + force) / seconds:.1f} ms per second of loop")
    if args.json:
        pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
