"""What a step costs the device, as benchmarks and reports read it: a profiler trace read
back (serve_app/engine/profile.py), and the device memory in use (engine/device.py)."""

from __future__ import annotations

import gzip
import json

import pytest

from serve_app.engine.profile import profile_line, read_events, summarize

HOST, GPU = 1, 2


def _meta(pid: int, tid: int | None, name: str) -> dict:
    if tid is None:
        return {"ph": "M", "pid": pid, "name": "process_name", "args": {"name": name}}
    return {"ph": "M", "pid": pid, "tid": tid, "name": "thread_name", "args": {"name": name}}


def _event(pid: int, tid: int, name: str, ts: float, dur: float, **args) -> dict:
    return {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": ts, "dur": dur,
            "args": args}


def gpu_trace() -> list[dict]:
    """Two 10 ms steps as a GPU trace has them: host annotations, kernels on a stream,
    and XLA's derived per-op line repeating the same kernels."""
    events = [_meta(HOST, None, "/host:CPU"), _meta(GPU, None, "/device:GPU:0"),
              _meta(HOST, 7, "python"), _meta(GPU, 1, "Stream #14(Compute)"),
              _meta(GPU, 2, "XLA Ops")]
    for step, start in enumerate((0.0, 20_000.0)):
        events += [
            _event(HOST, 7, "engine_step", start, 10_000, step_num=str(step)),
            _event(HOST, 7, "dispatch", start + 100, 4_000),
            # kernels at 1-3 ms and 2-5 ms (overlapping: 4 ms busy), and 8-9 ms
            _event(GPU, 1, "loop_fusion_kernel", start + 1_000, 2_000, hlo_op="fusion.1"),
            _event(GPU, 1, "gemm_kernel", start + 2_000, 3_000, hlo_op="dot.2"),
            _event(GPU, 1, "loop_fusion_kernel", start + 8_000, 1_000, hlo_op="fusion.1"),
            _event(GPU, 2, "fusion.1", start + 1_000, 2_000),  # the same work, by op
        ]
    # device work outside any step (warm-up before the trace's steps) is not a step's
    events.append(_event(GPU, 1, "memcpy", 15_000, 500))
    return events


def test_a_gpu_trace_says_how_busy_the_device_was_and_with_what():
    summary = summarize(gpu_trace())
    assert summary["steps"] == 2
    assert summary["step_ms"] == 10.0 and summary["dispatch_ms"] == 4.0
    # the union of 1-3, 2-5 and 8-9 ms: overlaps and the derived line count once
    assert summary["device_busy_ms"] == 5.0 and summary["device_busy_fraction"] == 0.5
    assert summary["device_events"] == 3  # the stream's kernels, not the derived line's
    assert summary["first_device_event_ms"] == 1.0
    assert summary["top_device_ops"] == [
        {"op": "fusion.1", "ms_per_step": 3.0, "count_per_step": 2.0},
        {"op": "dot.2", "ms_per_step": 3.0, "count_per_step": 1.0},
    ]
    assert "device busy 5.0 ms (50%) in 3 events" in profile_line(summary)


def test_a_cpu_trace_has_host_figures_and_says_there_is_no_device(tmp_path):
    events = [e for e in gpu_trace() if e["pid"] == HOST]
    path = tmp_path / "host.trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"displayTimeUnit": "ns", "traceEvents": events}, f)
    summary = summarize(read_events(path))
    assert summary["step_ms"] == 10.0 and summary["dispatch_ms"] == 4.0
    assert summary["device_busy_ms"] is None and summary["top_device_ops"] == []
    assert "no device lanes" in profile_line(summary)


@pytest.mark.parametrize("spans,busy", [([], 0.0), ([(0, 1000), (500, 700)], 1.0),
                                        ([(2000, 3000), (0, 1000)], 2.0)])
def test_busy_time_is_the_union_of_spans(spans, busy):
    from serve_app.engine.profile import _union_ms

    assert _union_ms(spans) == busy


def test_device_memory_is_the_allocators_count_in_gb(monkeypatch):
    """`memory_gb` (the /health field, the gauge, bench_engine's figures) as a GPU's
    allocator reports it, and None where the backend keeps no count, as XLA:CPU's."""
    import types

    import jax

    from serve_app.engine.device import memory_gb

    stats = {"bytes_in_use": 5_020_000_000, "peak_bytes_in_use": 14_650_000_000,
             "bytes_limit": 150_000_000_000, "num_allocs": 7}
    monkeypatch.setattr(jax, "devices", lambda: [types.SimpleNamespace(memory_stats=lambda: stats)])
    assert memory_gb() == {"in_use": 5.02, "peak": 14.65, "limit": 150.0}
    monkeypatch.setattr(jax, "devices", lambda: [types.SimpleNamespace(memory_stats=lambda: None)])
    assert memory_gb() is None
    monkeypatch.undo()
    assert memory_gb() is None  # this box: XLA:CPU


def test_a_programs_memory_plan_is_xlas_in_gb_or_none():
    """`program_memory_gb` (bench_engine --program-memory): a real compiled program's plan,
    its 1 MB argument counted; None from a backend that plans nothing or cannot say."""
    import jax
    import jax.numpy as jnp

    from serve_app.engine.device import program_memory_gb

    compiled = jax.jit(lambda a: (a @ a).sum()).lower(jnp.ones((512, 512))).compile()
    plan = program_memory_gb(compiled)
    assert set(plan) == {"temp", "arguments", "outputs", "aliased", "code"}
    assert plan["arguments"] == round(512 * 512 * 4 / 1e9, 4)

    class Planless:
        def __init__(self, answer):
            self.answer = answer

        def memory_analysis(self):
            if isinstance(self.answer, Exception):
                raise self.answer
            return self.answer

    assert program_memory_gb(Planless(None)) is None
    assert program_memory_gb(Planless(NotImplementedError("no analysis"))) is None
