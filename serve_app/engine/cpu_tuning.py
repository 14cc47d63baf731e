"""The two rewrites that make a step fast on XLA's CPU backend, applied together.

Both were found by profiling mrt2_small on the 2-core box (docs/performance.md):
transposed convolutions without dilated inputs (`conv_transpose`) and weights
stored in the order XLA's matmuls read (`weight_layout`). Neither changes what is
computed; both only change how XLA:CPU is asked to compute it. On accelerators
they are not applied: their effect there has not been measured.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax

from .conv_transpose import without_lhs_dilation
from .weight_layout import WeightLayout


def wanted() -> bool:
    """Whether steps on JAX's default backend are tuned: on the CPU only."""
    return jax.default_backend() == "cpu"


def tune(
    fn: Callable[..., Any], params: Any, *example: Any, enabled: bool
) -> tuple[Callable[..., Any], WeightLayout]:
    """`fn(params, *args)` -> (`tuned(weights, *args)`, the layout that makes
    `weights` from `params`). `example` are arguments of the right shapes, traced
    once to pick the layout. Disabled, `tuned` is `fn` and weights are params."""
    if not enabled:
        return fn, WeightLayout.identity(params)
    layout = WeightLayout.of(fn, params, *example)
    rewritten = without_lhs_dilation(fn)

    @functools.wraps(fn)  # keeps the name profiles and the compile cache show
    def tuned(weights: Any, *args: Any) -> Any:
        return rewritten(layout.restore(weights), *args)

    return tuned, layout
