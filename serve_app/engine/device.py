"""Which device JAX computes on, in words, for reports (`/health`, the benchmarks)."""

from __future__ import annotations

from typing import Any

import jax


def device_name() -> str:
    """Platform, device kind and count of JAX's default devices, e.g. "gpu:NVIDIA H100 80GB
    HBM3 x1" or "cpu:cpu x1": a replica that fell back to CPU says so here."""
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', d.platform)} x{jax.device_count()}"


def memory_gb() -> dict[str, float] | None:
    """The default device's memory as its allocator counts it (GB in use, the peak since
    the process started, the limit), or None where the backend keeps no count (CPU).
    What a replica's weights, states and compiled steps take, and the headroom left:
    JAX's GPU replicas do not preallocate (`deployments/app.py`), so this is their own."""
    stats = jax.devices()[0].memory_stats()
    if not stats:
        return None
    keys = {"in_use": "bytes_in_use", "peak": "peak_bytes_in_use", "limit": "bytes_limit"}
    return {name: round(stats[key] / 1e9, 3) for name, key in keys.items() if key in stats}


def program_memory_gb(compiled: Any) -> dict[str, float] | None:
    """What XLA planned for one compiled program on its device (GB): its temporary
    buffers, arguments, outputs (aliased ones, e.g. a donated state, counted once in
    `aliased`) and code; None where the backend plans nothing it reports. A program's
    temporary memory is what it needs beyond the weights and states a replica holds:
    the compile-time figure that says whether a step or a forced run fits beside them."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # a backend without the analysis
        return None
    if stats is None:
        return None
    fields = {"temp": "temp_size_in_bytes", "arguments": "argument_size_in_bytes",
              "outputs": "output_size_in_bytes", "aliased": "alias_size_in_bytes",
              "code": "generated_code_size_in_bytes"}
    return {name: round(getattr(stats, key, 0) / 1e9, 4) for name, key in fields.items()}


def on_cpu() -> bool:
    """JAX computes on this host's CPU. Several choices follow from it: the step's CPU
    rewrites (`cpu_tuning`), float32 compute (`loader`), 1-row steps (`batch.min_rows`),
    and replies let out before the next step, which would take their cores (generator)."""
    return jax.default_backend() == "cpu"
