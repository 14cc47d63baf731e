"""What limits an engine step, from a profile of a few of them.

`profile_steps` runs steps of a `BatchedEngine` under `jax.profiler` (the trace stays on
disk for Perfetto or TensorBoard) and `summarize` reads the trace back into figures a
benchmark's JSON can carry: per step, its wall time, the host's share before the step
runs on its own (`dispatch`), and on an accelerator how long the device was busy, with
how many kernels, and which operations took the time. A step whose device is busy for
most of its wall time is bound by its kernels; one whose device idles between many
short kernels is bound by launching them (docs/performance.md: 6.5 of a 12.1 ms
mrt2_base step on an H200 went by before `dispatch` returned).

The trace is the Chrome trace-event form jax.profiler writes (`*.trace.json.gz`):
complete events (`ph: X`, `ts`/`dur` in microseconds) in processes named `/host:CPU`
and, on accelerators, `/device:GPU:0` and the like, whose threads are the device's
streams (and lines XLA derives from them, which overlap the streams'; busy time is
their union, so that counts nothing twice). XLA:CPU runs a step's work on host threads
and names no device process: there the device figures are absent (as on a GPU whose
profiler cannot load CUPTI, which JAX then warns about).
"""

from __future__ import annotations

import collections
import gzip
import json
import pathlib
import statistics
import time
from collections.abc import Iterable
from typing import Any

import jax

STEP = "engine_step"
DISPATCH = "dispatch"
TOP_OPS = 12


def profile_steps(engine: Any, where: pathlib.Path, steps: int = 5) -> dict[str, Any]:
    """Runs `steps` engine steps (dispatch, fetch, finish, as `bench_engine` times
    them) under the profiler, writing the trace under `where`; returns `summarize`'s
    figures and the trace's path."""
    where.mkdir(parents=True, exist_ok=True)
    with jax.profiler.trace(str(where)):
        for i in range(steps):
            with jax.profiler.StepTraceAnnotation(STEP, step_num=i):
                engine_step(engine)
    trace = max(where.glob("plugins/profile/*/*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    return {**summarize(read_events(trace)), "trace": str(trace)}


def engine_step(engine: Any) -> float:
    """One engine step as a server runs it (dispatch, then the audio fetched and
    finished); returns the ms `dispatch` took: the host's share before the step runs on
    its own, which a pipelined loop overlaps with the step before. Its dispatch is
    annotated for a trace, if one is running (about a microsecond otherwise)."""
    t0 = time.perf_counter()
    with jax.profiler.TraceAnnotation(DISPATCH):
        pending = engine.dispatch()
    dispatch_ms = (time.perf_counter() - t0) * 1000
    engine.finish(pending.fetch())
    return dispatch_ms


def read_events(path: pathlib.Path) -> list[dict[str, Any]]:
    with gzip.open(path, "rt") as f:
        trace = json.load(f)
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def _union_ms(spans: Iterable[tuple[float, float]]) -> float:
    """Total length of the union of [start, end) spans (microseconds in, ms out)."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(spans):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total / 1000


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def summarize(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-step medians of wall, dispatch and device figures, and the device's top
    operations by time a step. Steps are the `STEP` annotations; a device event belongs
    to the step its start falls in."""
    names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e.get("args", {}).get("name", "") for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
    steps = sorted((e for e in complete if e.get("name") == STEP), key=lambda e: e["ts"])
    dispatches = [e for e in complete if e.get("name") == DISPATCH]
    device = [e for e in complete if names.get(e["pid"], "").startswith("/device:")]
    # kernels and copies are on the streams; XLA's derived lines repeat them by op
    streams = [e for e in device if threads.get((e["pid"], e["tid"]), "").startswith("Stream")]
    kernels = streams or device

    def within(step: dict[str, Any], found: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [e for e in found if step["ts"] <= e["ts"] < step["ts"] + step["dur"]]

    per_step = []
    ops: collections.Counter[str] = collections.Counter()
    op_counts: collections.Counter[str] = collections.Counter()
    for step in steps:
        row = {"step_ms": step["dur"] / 1000,
               "dispatch_ms": sum(e["dur"] for e in within(step, dispatches)) / 1000}
        if device:
            mine = within(step, kernels)
            row["device_busy_ms"] = _union_ms(
                (e["ts"], e["ts"] + e["dur"]) for e in within(step, device))
            row["device_events"] = len(mine)
            if mine:
                row["first_device_event_ms"] = (min(e["ts"] for e in mine) - step["ts"]) / 1000
            for e in mine:
                op = e.get("args", {}).get("hlo_op") or e["name"]
                ops[op] += e["dur"] / 1000
                op_counts[op] += 1
        per_step.append(row)

    summary: dict[str, Any] = {"steps": len(per_step)}
    for key in ("step_ms", "dispatch_ms", "device_busy_ms", "device_events",
                "first_device_event_ms"):
        values = [row[key] for row in per_step if key in row]
        summary[key] = _median(values)
    if summary["device_busy_ms"] is not None and summary["step_ms"]:
        summary["device_busy_fraction"] = round(summary["device_busy_ms"] / summary["step_ms"], 3)
    if per_step:
        summary["top_device_ops"] = [
            {"op": op, "ms_per_step": round(ms / len(per_step), 3),
             "count_per_step": round(op_counts[op] / len(per_step), 1)}
            for op, ms in ops.most_common(TOP_OPS)
        ]
    return summary


def profile_line(summary: dict[str, Any]) -> str:
    """`summarize`'s figures in one line, for a benchmark's table."""
    line = f"step {summary['step_ms']} ms, dispatch {summary['dispatch_ms']} ms"
    if summary.get("device_busy_ms") is None:
        return (f"{line}; no device lanes in the trace (XLA:CPU runs the step on host "
                "threads; a GPU without CUPTI records none)")
    top = ", ".join(f"{op['op']} {op['ms_per_step']} ms (x{op['count_per_step']})"
                    for op in summary["top_device_ops"][:3])
    return (f"{line}; device busy {summary['device_busy_ms']} ms "
            f"({summary['device_busy_fraction']:.0%}) in {summary['device_events']:.0f} events, "
            f"the first {summary['first_device_event_ms']} ms in; top: {top}")
