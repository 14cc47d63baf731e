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

from collections.abc import Callable, Sequence
from typing import Any

import jax

from . import exported
from .conv_transpose import without_lhs_dilation
from .weight_layout import Reader, WeightLayout


def tune(
    fn: Callable[..., Any], params: Any, *example: Any, enabled: bool, narrow: bool = True,
    salt: str | None = None, readers: Sequence[Reader] = (),
) -> tuple[Callable[..., Any], WeightLayout]:
    """`fn(params, *args)` -> (`tuned(weights, *args)`, the layout that makes
    `weights` from `params`). `example` are arguments of the right shapes, traced
    once to pick the layout. `enabled`: the two CPU rewrites. On every backend,
    weights the step only reads narrowed (float32 ones a bfloat16 step converts) are
    stored narrowed (`weight_layout`) unless `narrow` is False. With neither, `tuned`
    is `fn` and weights are params. With a `salt` (what `fn`'s closure holds beyond its
    arguments, as for `exported.jit`), the layout chosen is kept on disk with the traced
    programs, and a later start reads it instead of tracing `fn` (4.4 s for mrt2_base).
    `readers`: the other functions that will read the same weights (`WeightLayout.of`),
    through `layout.reading`."""
    def choose() -> tuple[dict, dict]:
        chosen = WeightLayout.of(fn, params, *example, permute=enabled, narrow=narrow,
                                 readers=readers)
        return chosen.perms, chosen.casts

    if salt is None:
        perms, casts = choose()
    else:
        names = ",".join(getattr(f, "__name__", "fn") for f, _ in readers)
        perms, casts = exported.remembered(
            f"{getattr(fn, '__name__', 'fn')}-layout",
            f"{salt}|{enabled}|{narrow}|readers={names}",
            (params, *example, *(args for _, args in readers)), choose)
    layout = WeightLayout(jax.tree.structure(params), perms, casts)
    if not enabled and layout.changes_nothing:
        return fn, layout
    return layout.reading(without_lhs_dilation(fn) if enabled else fn), layout
