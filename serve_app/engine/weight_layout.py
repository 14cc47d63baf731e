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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.extend import core
from jax.extend.core.primitives import dot_general_p

Perm = tuple[int, ...]


def _canonical_perm(eqn: core.JaxprEqn, operand: int) -> Perm:
    """The order of an operand's dims in XLA's canonical dot: batch, then M or K."""
    (contracting, batch) = eqn.params["dimension_numbers"]
    own_contracting, own_batch = contracting[operand], batch[operand]
    ndim = eqn.invars[operand].aval.ndim
    free = [d for d in range(ndim) if d not in own_contracting and d not in own_batch]
    if operand == 0:  # lhs: [batch, M, K]
        return (*own_batch, *free, *own_contracting)
    return (*own_batch, *own_contracting, *free)  # rhs: [batch, K, N]


def _dot_perms(jaxpr: core.Jaxpr, weights: list[core.Var]) -> dict[int, Perm]:
    """Weight index -> permutation, for weights used only as dot operands that all
    want the same non-identity order."""
    index = {v: i for i, v in enumerate(weights)}
    wanted: dict[int, set[Perm | None]] = {}
    for eqn in jaxpr.eqns:
        for position, var in enumerate(eqn.invars):
            if isinstance(var, core.Literal) or var not in index:
                continue
            usable = eqn.primitive is dot_general_p and position < 2
            perm = _canonical_perm(eqn, position) if usable else None
            wanted.setdefault(index[var], set()).add(perm)
    return {
        i: perm
        for i, perms in wanted.items()
        if len(perms) == 1
        and (perm := next(iter(perms))) is not None
        and perm != tuple(range(len(perm)))
    }


@dataclasses.dataclass(frozen=True)
class WeightLayout:
    """Which weights are stored permuted, and how; the tree structure they live in."""

    treedef: Any
    perms: dict[int, Perm]

    @classmethod
    def of(cls, fn: Callable[..., Any], params: Any, *args: Any) -> WeightLayout:
        """Traces `fn(params, *args)` (shapes only) to find the weights to permute."""
        closed = jax.make_jaxpr(fn)(params, *args)
        leaves, treedef = jax.tree.flatten(params)
        weights = closed.jaxpr.invars[: len(leaves)]
        return cls(treedef, _dot_perms(closed.jaxpr, weights))

    @classmethod
    def identity(cls, params: Any) -> WeightLayout:
        """Every weight as it is: `prepare` and `restore` return the same arrays."""
        return cls(jax.tree.structure(params), {})

    def _map(self, tree: Any, permute: Callable[[jax.Array, Perm], jax.Array]) -> Any:
        if not self.perms:
            return tree
        leaves, treedef = jax.tree.flatten(tree)
        if treedef != self.treedef:
            raise ValueError("weights: tree differs from the one this layout was made for")
        leaves = [
            permute(leaf, self.perms[i]) if i in self.perms else leaf
            for i, leaf in enumerate(leaves)
        ]
        return jax.tree.unflatten(treedef, leaves)

    def prepare(self, params: Any) -> Any:
        """The weights as the step takes them (the permuted ones are new arrays)."""
        return self._map(params, lambda w, perm: jax.numpy.transpose(w, perm))

    def restore(self, prepared: Any) -> Any:
        """Inside the step: the weights in their own layout again, as views XLA folds."""
        return self._map(
            prepared, lambda w, perm: jax.numpy.transpose(w, tuple(np.argsort(perm)))
        )
