#!/usr/bin/env python3
"""Prefill benchmark: what putting a loop into a session's context costs.

    scripts/bench_prefill.py [--variant tiny] [--repeats 3] [--random-weights] [--json out.json]

Timed on the same machine in one run: encoding the tiled loop context with the
SpectroStream encoder (one jitted call), then teacher-forcing its codes into a
session two ways: frame by frame (one forced frame per batched step, as before
forced runs existed) and as the engine does it now, in forced runs of up to 64
frames (`BatchedEngine.prefill_runs`). Reported per frame of context and per second
of loop audio, with the ratio. Needs a repo with
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
from tqdm import tqdm

from serve_app import logs
from serve_app.audio.barclock import BarClock
from serve_app.audio.context import tiled_context
from serve_app.cli_args import integer
from serve_app.engine import BatchedEngine, Session, load_model
from serve_app.engine.variants import FRAMES_PER_SECOND


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="tiny")
    parser.add_argument("--repo", default=None)
    parser.add_argument("--repeats", type=integer(1), default=3)
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

    encode_ms = []
    force_ms: dict[str, list[float]] = {"frame_by_frame": [], "runs": []}
    engines = {"frame_by_frame": BatchedEngine(loaded.model, loaded.style, buckets=(1,),
                                               prefill_run_frames=1),
               "runs": BatchedEngine(loaded.model, loaded.style, buckets=(1,))}
    for engine in engines.values():
        engine.warmup()
    for i in range(args.repeats):
        t0 = time.perf_counter()
        codes = encoder.encode(context)[-frames:]
        encode_ms.append((time.perf_counter() - t0) * 1000)
        for mode, engine in engines.items():  # alternated, so drift hits both alike
            session = Session(loaded.style.embed_text("techno"), seed=i)
            session.prefill(codes)
            engine.add(session)
            bar = tqdm(total=frames, desc=f"repeat {i + 1}: {mode}", unit="frame", leave=False)
            t0 = time.perf_counter()
            while session.prefill_pending:
                bar.update(engine.step()[session.id].n_frames)
            force_ms[mode].append((time.perf_counter() - t0) * 1000)
            bar.close()
            engine.remove(session.id)

    seconds = frames / FRAMES_PER_SECOND
    enc = statistics.median(encode_ms)
    by_frame, runs = (statistics.median(force_ms[m]) for m in ("frame_by_frame", "runs"))
    result = {
        "variant": args.variant, "context_frames": frames, "context_seconds": seconds,
        "prefill_runs": list(engines["runs"].prefill_runs),
        "encode_ms": round(enc, 2),
        "force_ms_frame_by_frame": round(by_frame, 2), "force_ms": round(runs, 2),
        "force_ms_per_frame": round(runs / frames, 3),
        "runs_speedup": round(by_frame / runs, 2),
        "prefill_ms_per_second_of_loop": round((enc + runs) / seconds, 2),
        "prefill_total_ms": round(enc + runs, 2),
    }
    print(f"{args.variant}: context {frames} frames ({seconds:g} s); encode {enc:.1f} ms; "
          f"force frame by frame {by_frame:.1f} ms, in runs {runs:.1f} ms "
          f"({by_frame / runs:.1f}x); {(enc + runs) / seconds:.1f} ms per second of loop")
    if args.json:
        pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
