"""Which device JAX computes on, in words, for reports (`/health`, the benchmarks)."""

from __future__ import annotations

import jax


def device_name() -> str:
    """Platform, device kind and count of JAX's default devices, e.g. "gpu:NVIDIA H100 80GB
    HBM3 x1" or "cpu:cpu x1": a replica that fell back to CPU says so here."""
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', d.platform)} x{jax.device_count()}"


def on_cpu() -> bool:
    """JAX computes on this host's CPU. Several choices follow from it: the step's CPU
    rewrites (`cpu_tuning`), float32 compute (`loader`), 1-row steps (`batch.min_rows`),
    and replies let out before the next step, which would take their cores (generator)."""
    return jax.default_backend() == "cpu"
