"""The two rewrites that make a step fast on XLA's CPU backend, applied together.

Both were found by profiling mrt2_small on the 2-core box (docs/performance.md):
transposed convolutions without dilated inputs (`conv_transpose`) and weights
stored in the order XLA's matmuls read (`weight_layout`). Neither changes what is
computed; both only change how XLA:CPU is asked to compute it. On accelerators
they are not applied: their effect there has not been measured. `tune` is also
where, on every backend, weights are stored in the narrower dtype the step converts
them to (bfloat16 on accelerators; float32 on CPU, where nothing is converted).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from .conv_transpose import without_lhs_dilation
from .weight_layout import WeightLayout


def tune(
    fn: Callable[..., Any], params: Any, *example: Any, enabled: bool, narrow: bool = True
) -> tuple[Callable[..., Any], WeightLayout]:
    """`fn(params, *args)` -> (`tuned(weights, *args)`, the layout that makes
    `weights` from `params`). `example` are arguments of the right shapes, traced
    once to pick the layout. `enabled`: the two CPU rewrites. On every backend,
    weights the step only reads narrowed (float32 ones a bfloat16 step converts) are
    stored narrowed (`weight_layout`) unless `narrow` is False. With neither, `tuned`
    is `fn` and weights are params."""
    layout = WeightLayout.of(fn, params, *example, permute=enabled, narrow=narrow)
    if not enabled and layout.changes_nothing:
        return fn, layout
    body = without_lhs_dilation(fn) if enabled else fn

    @functools.wraps(fn)  # keeps the name profiles and the compile cache show
    def tuned(weights: Any, *args: Any) -> Any:
        return body(layout.restore(weights), *args)

    return tuned, layout
