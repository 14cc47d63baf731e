"""Programs a process runs once: compiled without XLA's optimisations.

Random initialisation (the `tiny` repo, `--random-weights` benchmarks) traces the
whole model to create its parameters, and XLA:CPU spends 20-25 s optimising that
graph on 2 cores for a program that then runs once, in well under a second.
Optimisation level 0 without LLVM's expensive passes compiles it in about a quarter
of the time; its random values agree with the optimised program's to float
rounding (within 1e-7), which no test or use depends on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

UNOPTIMISED = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def run_once(fn: Callable[..., Any], *args: Any) -> Any:
    """`jax.jit(fn)(*args)`, compiled for a single run (through the compilation cache,
    which keys on these options too)."""
    return jax.jit(fn).lower(*args).compile(compiler_options=UNOPTIMISED)(*args)
