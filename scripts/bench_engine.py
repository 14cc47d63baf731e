#!/usr/bin/env python3
"""Engine benchmark: ms/frame and real-time factor per batch size, against upstream.

    scripts/bench_engine.py --variant mrt2_small --batch 1,2,4,8 --json out.json \\
        [--compare-upstream] [--breakdown] [--frames 30] [--compute-dtype auto|float32|bfloat16]
        [--wide-weights] [--untuned] [--profile DIR] [--program-memory]

Random weights (speed does not depend on their values). Each row times whole
engine steps as a server runs them: conditioning for every session, one batched
jitted step, audio back on the host; `dispatch_ms` is the part of it before
`BatchedEngine.dispatch` returns (inputs built, the call into JAX).
`--compare-upstream` times magenta_rt's own `MagentaRT2System` streaming step
(batch 1) on the same weights in the same run.
`--wide-weights` keeps the weights as loaded (float32) where the step computes in
bfloat16, instead of storing those it only converts converted (before/after).
`--breakdown` also times the step's two halves alone at each batch size (the
depthformer that samples the frame's 12 codes, and the codec decoder that turns
them into audio): the profile that says which one limits a batch. With XLA's
count of each half's FLOPs and one large matmul timed on the same device, it also
says how close each half runs to the arithmetic limit.
`--profile DIR` then runs a few more steps per batch size under jax.profiler (the
trace stays in DIR for Perfetto or TensorBoard) and adds what it shows to each row
(`serve_app/engine/profile.py`): the device's busy time a step, its kernel count
and top operations, i.e. whether kernels or their launching bound the step.
`--program-memory` adds XLA's memory plan (temporary buffers, arguments, outputs) of
each batch size's step (in its row) and, once (`run_memory_gb`: one row whatever the
batch), of the forced runs a loop is put in with: compiled as a replica's warm-up
compiles them, not run (the figure behind a compile's "can't reduce memory use"
warning, and what fits beside the weights).
Runs without Ray: it only needs serve_app and JAX.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import pathlib
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import magenta_rt  # noqa: F401  (puts its vendored sequence_layers on the path)
import numpy as np
import sequence_layers.jax as sl
from tqdm import tqdm

from serve_app import logs
from serve_app.cli_args import integer, positive_ints
from serve_app.engine import BatchedEngine, Session, cpu_tuning, load_model, weights
from serve_app.engine.conditioning import DEFAULT_CFG, build_block
from serve_app.engine.device import device_name, memory_gb
from serve_app.engine.model import StreamingModel, build_sampler, decode_step, dummy_inputs
from serve_app.engine.profile import engine_step, profile_line, profile_steps
from serve_app.engine.variants import FRAMES_PER_SECOND

FRAME_MS = 1000 / FRAMES_PER_SECOND
PEAK_MATMUL_N = 2048


def time_steps(step, frames: int, warmup: int, desc: str) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in tqdm(range(frames), desc=desc, unit="frame", leave=False):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1000)
    return times


def time_engine_steps(engine: BatchedEngine, frames: int, warmup: int,
                      desc: str) -> tuple[list[float], list[float]]:
    """Whole engine steps as a server runs them (ms), and of each the time `dispatch`
    took to return: the host's share before the step runs on its own, which a pipelined
    loop overlaps with the step before and a lone realtime session waits through."""
    dispatch_ms = []
    times = time_steps(lambda: dispatch_ms.append(engine_step(engine)), frames, warmup, desc)
    return times, dispatch_ms[warmup:]


def _depthformer_step(module, block, state, constants):
    depthformer = module.layers[0]
    codes, df_state = depthformer.step(block, state[0], training=False, constants=constants)
    return codes.values, df_state


def _decoder_step(module, codes, state, constants):
    x, new_state = decode_step(module.layers[1:], sl.Sequence.from_values(codes), state[1:],
                               constants)
    return x.values, new_state


def xla_gflop(compiled) -> float | None:
    """XLA's own count of the floating-point work in one call (None where the backend
    gives no cost analysis): with a time, it says how close a step runs to the device's
    arithmetic limit (`matmul_peak_gflops`)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = (cost or {}).get("flops")
    # to the kFLOP: tiny's halves are a few tens of MFLOP, where 3 decimals of a GFLOP
    # would be off by up to 3%
    return round(flops / 1e9, 6) if flops else None


def matmul_peak_gflops(dtype, n: int = PEAK_MATMUL_N, frames: int = 5) -> float:
    """GFLOP/s of one large square matmul in the step's dtype: the best case XLA reaches
    on this device, the ceiling against which a step's GFLOP/s is read."""
    a = jnp.ones((n, n), dtype)
    matmul = jax.jit(jnp.matmul)
    ms = statistics.median(time_steps(lambda: jax.block_until_ready(matmul(a, a)), frames, 1,
                                      f"matmul {n}x{n}"))
    return round(2 * n**3 / (ms / 1000) / 1e9, 1)


def breakdown(model: StreamingModel, batch: int, frames: int, warmup: int) -> dict:
    """ms per step of the depthformer alone and of the codec decoder alone, each
    tuned for the backend as the engine's whole step is (cpu_tuning), with XLA's
    count of each half's GFLOP and the GFLOP/s that makes."""
    sampler, params = model.sampler, model.restored_params()
    state = jax.tree.map(lambda a: jnp.repeat(a, batch, axis=0), model.state_at(0))
    block, constants = dummy_inputs(batch)

    def jitted(method, *example):
        fn, layout = cpu_tuning.tune(
            lambda p, x, s: sampler.apply(p, x, s, constants, method=method),
            params, *example, enabled=model.tune_for_cpu, narrow=model.narrow_weights,
        )
        weights = layout.prepare(params)
        step = jax.jit(fn).lower(weights, *example).compile()
        return (lambda *args: jax.block_until_ready(step(weights, *args))), xla_gflop(step)

    lm, lm_gflop = jitted(_depthformer_step, block, state)
    codes, _ = lm(block, state)
    dec, dec_gflop = jitted(_decoder_step, codes, state)
    row = {}
    for name, call, args, gflop in (("depthformer", lm, (block, state), lm_gflop),
                                    ("decoder", dec, (codes, state), dec_gflop)):
        ms = statistics.median(time_steps(functools.partial(call, *args), frames, warmup,
                                          name))
        row[f"{name}_ms"] = round(ms, 3)
        row[f"{name}_gflop"] = gflop
        row[f"{name}_gflops"] = round(gflop / (ms / 1000), 2) if gflop else None
    return row


def bench_engine(loaded, batch: int, frames: int, warmup: int,
                 profile: pathlib.Path | None = None, program_memory: bool = False) -> dict:
    engine = BatchedEngine(loaded.model, loaded.style, buckets=(batch,))
    t0 = time.perf_counter()
    engine.warmup_buckets()  # steps only: this benchmark forces no loop
    compile_s = time.perf_counter() - t0
    style = loaded.style.embed_text("bench")
    for i in range(batch):
        engine.add(Session(style, seed=i))
    times, dispatch_ms = time_engine_steps(engine, frames, warmup, f"batch {batch}")
    ms = statistics.median(times)
    row = {
        "batch": batch,
        "rows": engine.capacity,  # more than batch where a step keeps a minimum (min_rows)
        "ms_per_frame": round(ms, 3),
        "ms_per_frame_p90": round(float(np.percentile(times, 90)), 3),
        "dispatch_ms": round(statistics.median(dispatch_ms), 3),
        "frames_per_second": round(batch * 1000 / ms, 2),
        "rtf_per_stream": round(FRAME_MS / ms, 3),
        "realtime_streams": round(batch * FRAME_MS / ms, 2),
        "compile_seconds": round(compile_s, 1),
    }
    if profile is not None:
        row["profile"] = profile_steps(engine, profile / f"batch-{batch}")
    if program_memory:
        row["program_memory_gb"] = engine.step_memory_gb()
    return row


def _upstream_system_step(loaded, variant: str, workdir: pathlib.Path):
    """magenta_rt's MagentaRT2System on our random weights, written as its checkpoint."""
    from magenta_rt.jax.system import MagentaRT2System
    from magenta_rt.musiccoca import MockMusicCoCa

    ckpt = workdir / f"{variant}.safetensors"
    weights.save(loaded.model.restored_params(), ckpt)
    system = MagentaRT2System(size=variant, style_model=MockMusicCoCa(), checkpoint=str(ckpt))
    block, constants = system._build_conditioning({})
    state = [system._jit_init_state(system._params, {})]

    def step():
        out, state[0], _ = system._jit_streaming_step(system._params, block, constants, state[0])
        jax.block_until_ready(out)

    return step, "magenta_rt.jax.system.MagentaRT2System streaming step (batch 1)"


def _upstream_sampler_step(loaded):
    """For tiny, which MagentaRT2System cannot build (its codec is hard-wired): the
    library sampler with upstream's decoder, jitted exactly like the system's step."""
    variant = loaded.variant
    sampler = build_sampler(
        variant, compute_dtype=variant.default_compute_dtype(), fast_sampling=False
    )
    params = loaded.model.restored_params()
    model = StreamingModel(variant, sampler, params, tune_for_cpu=False)
    tokens = build_block(None, np.full(128, -1, np.int32), -1, DEFAULT_CFG)[None, None]
    block = sl.Sequence.from_values(jnp.asarray(tokens))
    constants = {"temperature": jnp.array([1.3]), "top_k": jnp.array([40], jnp.int32)}
    jitted = jax.jit(
        lambda p, x, c, s: sampler.apply(
            p, x=x, state=s, constants=c, training=False,
            rngs={"random": jax.random.PRNGKey(0)}, method=sampler.step_with_emits,
        ),
        donate_argnums=(3,),
    )
    state = [model.state_at(0)]

    def step():
        out, state[0], _ = jitted(params, block, constants, state[0])
        jax.block_until_ready(out)

    return step, "magenta_rt sampler step_with_emits, upstream decoder, model dtype (batch 1)"


def _plan_line(plan: dict[str, float] | None) -> str:
    return (", ".join(f"{k} {v:g} GB" for k, v in plan.items()) if plan
            else "no memory plan from this backend")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--variant", default="tiny")
    parser.add_argument("--batch", type=positive_ints, default="1,2,4,8")
    parser.add_argument("--frames", type=integer(1), default=30,
                        help="timed frames per batch size")
    parser.add_argument("--warmup", type=integer(0), default=3,
                        help="untimed frames after compiling")
    parser.add_argument("--compute-dtype", default="auto")
    parser.add_argument("--compare-upstream", action="store_true")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time the depthformer and the codec decoder alone")
    parser.add_argument("--untuned", action="store_true",
                        help="the step as traced, without the CPU rewrites (before/after)")
    parser.add_argument("--wide-weights", action="store_true",
                        help="weights as loaded (float32), not stored in the dtype a "
                             "bfloat16 step converts them to (before/after)")
    parser.add_argument("--profile", type=pathlib.Path, default=None, metavar="DIR",
                        help="profile a few more steps per batch size; traces under DIR")
    parser.add_argument("--program-memory", action="store_true",
                        help="XLA's memory plan of each batch size's step and of the "
                             "forced runs (compiled, not run)")
    parser.add_argument("--json", type=pathlib.Path, default=None)
    args = parser.parse_args()
    logs.configure()

    batches = args.batch
    print(f"loading {args.variant} with random weights on {device_name()} ...", flush=True)
    loaded = load_model(args.variant, random_weights_seed=0, compute_dtype=args.compute_dtype)
    if args.untuned or args.wide_weights:
        model = loaded.model
        loaded = dataclasses.replace(loaded, model=StreamingModel(
            model.variant, model.sampler, model.restored_params(),
            tune_for_cpu=model.tune_for_cpu and not args.untuned,
            narrow_weights=not args.wide_weights))
        del model  # its weights leave the device: the memory figures are the new model's
    gc.collect()
    loaded_memory = memory_gb()
    tuned = loaded.model.tune_for_cpu
    dtype = jnp.dtype(loaded.model.sampler.cfg.depthformer.encoder.compute_dtype).name
    results = []
    for b in batches:
        row = bench_engine(loaded, b, args.frames, args.warmup, args.profile,
                           args.program_memory)
        if args.breakdown:
            row.update(breakdown(loaded.model, b, args.frames, args.warmup))
        print(json.dumps(row), flush=True)  # each row as it lands: long runs show progress
        results.append(row)

    report = {
        "variant": args.variant,
        "device": device_name(),
        "compute_dtype": dtype,
        "cpu_tuned": tuned,
        # weight arrays stored narrowed for the step (weight_layout), and the step's
        # weight bytes that makes
        "narrowed_weights": len(loaded.model.layout.casts),
        "step_weight_gb": round(sum(w.nbytes for w in jax.tree.leaves(loaded.model.weights))
                                / 1e9, 3),
        # the device's allocator (GPU; None on CPU): after loading, and after the steps
        # (their states and workspace; the peak includes loading)
        "device_memory_gb_loaded": loaded_memory,
        "device_memory_gb": memory_gb(),
        "frames_timed": args.frames,
        "results": results,
    }
    if args.program_memory:  # the forced runs are one row whatever the batch: once
        report["run_memory_gb"] = BatchedEngine(loaded.model, loaded.style,
                                                buckets=batches[:1]).run_memory_gb()
    if args.breakdown:
        report["matmul_peak_gflops"] = matmul_peak_gflops(dtype)
    base = next((r for r in results if r["batch"] == 1), None)
    if base:
        for r in results:
            r["fps_vs_batch1"] = round(r["frames_per_second"] / base["frames_per_second"], 2)
    if args.compare_upstream:
        with tempfile.TemporaryDirectory() as tmp:
            if args.variant == "tiny":
                step, kind = _upstream_sampler_step(loaded)
            else:
                step, kind = _upstream_system_step(loaded, args.variant, pathlib.Path(tmp))
            times = time_steps(step, max(5, args.frames // 3), 1, "upstream")
        report["upstream_kind"] = kind
        report["upstream_ms_per_frame"] = round(statistics.median(times), 3)
        if base:
            report["speedup_vs_upstream"] = round(
                report["upstream_ms_per_frame"] / base["ms_per_frame"], 2
            )

    print(f"\n{args.variant} on {report['device']} ({dtype}"
          f"{', CPU-tuned step' if tuned else ''})")
    print(f"{'batch':>5} {'ms/frame':>9} {'p90':>8} {'dispatch':>8} {'frames/s':>9} "
          f"{'RTF/stream':>10} {'RT streams':>10} {'x batch1':>8} {'compile s':>9}")
    for r in results:
        print(f"{r['batch']:>5} {r['ms_per_frame']:>9.2f} {r['ms_per_frame_p90']:>8.2f} "
              f"{r['dispatch_ms']:>8.2f} "
              f"{r['frames_per_second']:>9.1f} {r['rtf_per_stream']:>10.2f} "
              f"{r['realtime_streams']:>10.2f} {r.get('fps_vs_batch1', 0):>8.2f} "
              f"{r['compile_seconds']:>9.1f}"
              + (f"  depthformer {r['depthformer_ms']:.2f} ({r['depthformer_gflops']} GFLOP/s)"
                 f" decoder {r['decoder_ms']:.2f} ({r['decoder_gflops']} GFLOP/s)"
                 if "decoder_ms" in r else ""))
    for r in results:
        if "profile" in r:
            print(f"batch {r['batch']} profile: {profile_line(r['profile'])}")
        for program, plan in r.get("program_memory_gb", {}).items():
            print(f"batch {r['batch']} {program}: {_plan_line(plan)}")
    for program, plan in report.get("run_memory_gb", {}).items():
        print(f"{program} (one row): {_plan_line(plan)}")
    if "matmul_peak_gflops" in report:
        print(f"one {PEAK_MATMUL_N}x{PEAK_MATMUL_N} {dtype} matmul: "
              f"{report['matmul_peak_gflops']} GFLOP/s (this device's best case)")
    if "upstream_ms_per_frame" in report:
        print(f"upstream: {report['upstream_ms_per_frame']:.2f} ms/frame "
              f"({report['upstream_kind']}); ours at batch 1 is "
              f"{report.get('speedup_vs_upstream', '?')}x faster")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
