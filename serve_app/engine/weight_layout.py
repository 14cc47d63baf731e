"""Weights stored in the layout XLA's matmuls read, so no step copies them.

XLA lowers every dot to a canonical matmul: the left operand as [batch, M, K] and
the right as [batch, K, N]. An operand laid out otherwise is transposed on every
call, even when it is a weight that never changes. Upstream's attention output
projections are such weights ([model, heads, head_dim], contracted on the last two
dims), and on the 2-core CPU box their copies were most of a mrt2_small
depthformer step (103 ms of thread time a frame, for 26 matrices).

`WeightLayout.of(fn, params, *args)` reads `fn`'s jaxpr once and finds, for each
weight whose every use is an operand of a dot, the permutation into that canonical
order. `prepare` stores those weights permuted (once per set of weights); inside
the step, `restore` transposes them back, which XLA cancels against its own
canonicalising transpose, leaving the matmul to read the stored array directly.

The same goes for dtypes, on every backend. Checkpoints hold float32 weights and a
bfloat16 step (accelerators) converts most of them on every call: mrt2_base's step
converts 489 of its 618 weight arrays, 2.41 G values, so it reads 9.6 GB of weights
where 4.8 GB would do, and writes the converted copies besides. A weight whose every
use is a conversion to one narrower float type is stored converted (`casts`);
`restore` widens it again, and XLA folds that exact widening into the step's own
narrowing, so the step reads the narrow array. Same rounding, same values.

The stored weights are the only copy a model keeps: the functions that read them
besides the step (a loop's prefill, a session's initial state) take them too, through
`reading`, and a weight is narrowed only where each of them also only narrows it, the
same way, so every reader computes with the values it would have read from the
checkpoint. (Keeping the float32 weights for those readers cost mrt2_base 9.8 GB of
device memory beside the step's 5.0.)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.extend import core
from jax.extend.core.primitives import convert_element_type_p, dot_general_p

Perm = tuple[int, ...]
Cast = tuple[np.dtype, np.dtype]  # (as stored, as the checkpoint has it)
Reader = tuple[Callable[..., Any], tuple[Any, ...]]  # fn(params, *args), its args


def _canonical_perm(eqn: core.JaxprEqn, operand: int) -> Perm:
    """The order of an operand's dims in XLA's canonical dot: batch, then M or K."""
    (contracting, batch) = eqn.params["dimension_numbers"]
    own_contracting, own_batch = contracting[operand], batch[operand]
    ndim = eqn.invars[operand].aval.ndim
    free = [d for d in range(ndim) if d not in own_contracting and d not in own_batch]
    if operand == 0:  # lhs: [batch, M, K]
        return (*own_batch, *free, *own_contracting)
    return (*own_batch, *own_contracting, *free)  # rhs: [batch, K, N]


def _wants(jaxpr: core.Jaxpr, weights: list[core.Var],
           want: Callable[[core.JaxprEqn, int], Any]) -> dict[int, set[Any]]:
    """Weight index -> the set of what each of its uses wants: `want(eqn, position)` for
    every equation that takes the weight as its `position`th operand (None: a use that
    rules the weight out)."""
    index = {v: i for i, v in enumerate(weights)}
    wanted: dict[int, set[Any]] = {}
    for eqn in jaxpr.eqns:
        for position, var in enumerate(eqn.invars):
            if not isinstance(var, core.Literal) and var in index:
                wanted.setdefault(index[var], set()).add(want(eqn, position))
    return wanted


def _dot_perms(jaxpr: core.Jaxpr, weights: list[core.Var]) -> dict[int, Perm]:
    """Weight index -> permutation, for weights used only as dot operands that all
    want the same non-identity order."""
    def perm(eqn: core.JaxprEqn, position: int) -> Perm | None:
        usable = eqn.primitive is dot_general_p and position < 2
        return _canonical_perm(eqn, position) if usable else None

    wanted = _wants(jaxpr, weights, perm)
    return {
        i: perm
        for i, perms in wanted.items()
        if len(perms) == 1
        and (perm := next(iter(perms))) is not None
        and perm != tuple(range(len(perm)))
    }


def _narrowing_casts(jaxprs: Sequence[core.Jaxpr], count: int) -> dict[int, Cast]:
    """Weight index -> (narrow dtype, own dtype), for float weights (the first `count`
    inputs of each jaxpr) that every jaxpr reading them uses only as the operand of
    conversions to one narrower float dtype, the same in all."""
    def target(eqn: core.JaxprEqn, position: int) -> np.dtype | None:
        return (np.dtype(eqn.params["new_dtype"])
                if eqn.primitive is convert_element_type_p else None)

    targets: dict[int, set[np.dtype | None]] = {}
    for jaxpr in jaxprs:
        weights = jaxpr.invars[:count]
        for i, wanted in _wants(jaxpr, weights, target).items():
            targets.setdefault(i, set()).update(wanted)
        for i, weight in enumerate(weights):
            if weight in jaxpr.outvars:  # returned as it is: not only converted
                targets.setdefault(i, set()).add(None)
    casts = {}
    for i, wanted in targets.items():
        own = np.dtype(jaxprs[0].invars[i].aval.dtype)
        if len(wanted) != 1:
            continue
        target = next(iter(wanted))
        if (target is not None and jax.numpy.issubdtype(own, jax.numpy.floating)
                and jax.numpy.issubdtype(target, jax.numpy.floating)
                and target.itemsize < own.itemsize):
            casts[i] = (target, own)
    return casts


@dataclasses.dataclass(frozen=True)
class WeightLayout:
    """Which weights are stored permuted or narrowed, and how; the tree structure they
    live in."""

    treedef: Any
    perms: dict[int, Perm]
    casts: dict[int, Cast] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, fn: Callable[..., Any], params: Any, *args: Any,
           permute: bool = True, narrow: bool = True, readers: Sequence[Reader] = ()
           ) -> WeightLayout:
        """Traces `fn(params, *args)` (shapes only) to find the weights to permute (when
        `permute`: XLA:CPU's canonical dot order) and those to store narrowed (when
        `narrow`). `readers`, other functions of the same weights, each with arguments
        to trace it on, only hold weights back from narrowing: the permutations are
        `fn`'s (the hot path); a reader that wants another order transposes its own."""
        leaves, treedef = jax.tree.flatten(params)
        jaxprs = [jax.make_jaxpr(f)(params, *a).jaxpr for f, a in ((fn, args), *readers)]
        perms = _dot_perms(jaxprs[0], jaxprs[0].invars[: len(leaves)]) if permute else {}
        casts = _narrowing_casts(jaxprs, len(leaves)) if narrow else {}
        return cls(treedef, perms, casts)

    @property
    def changes_nothing(self) -> bool:
        return not self.perms and not self.casts

    def describe(self) -> str:
        """What a traced step's cache key must hold of this layout."""
        casts = {i: f"{a.name}<{b.name}" for i, (a, b) in sorted(self.casts.items())}
        return f"perms={self.perms} casts={casts}"

    def _map(self, tree: Any, change: Callable[[int, jax.Array], jax.Array]) -> Any:
        if self.changes_nothing:
            return tree
        leaves, treedef = jax.tree.flatten(tree)
        if treedef != self.treedef:
            raise ValueError("weights: tree differs from the one this layout was made for")
        return jax.tree.unflatten(treedef, [change(i, leaf) for i, leaf in enumerate(leaves)])

    def prepare(self, params: Any) -> Any:
        """The weights as the step takes them (the permuted or narrowed ones are new
        arrays; the others are `params`' own). Host (numpy) weights are changed on the
        host, so that a float32 copy of a narrowed weight never reaches the device
        (numpy's bfloat16 rounds as XLA's conversion does: to nearest even)."""
        def change(i: int, w: jax.Array) -> jax.Array:
            if i in self.perms:
                xp = np if isinstance(w, np.ndarray) else jax.numpy
                w = xp.transpose(w, self.perms[i])
            if i in self.casts:
                w = w.astype(self.casts[i][0])
            return w

        return self._map(params, change)

    def restore(self, prepared: Any) -> Any:
        """Inside the step: the weights in their own layout and dtype again, as views
        and widenings XLA folds."""
        def change(i: int, w: jax.Array) -> jax.Array:
            if i in self.casts:
                w = w.astype(self.casts[i][1])
            if i in self.perms:
                w = jax.numpy.transpose(w, tuple(np.argsort(self.perms[i])))
            return w

        return self._map(prepared, change)

    def reading(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """`fn(params, *args)` as a function of the stored weights, `(weights, *args)`."""
        @functools.wraps(fn)  # keeps the name profiles and the compile cache show
        def read(weights: Any, *args: Any) -> Any:
            return fn(self.restore(weights), *args)

        return read
