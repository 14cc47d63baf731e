"""Transposed convolutions as one matmul plus overlap-add, for XLA on CPU.

The SpectroStream decoder upsamples with transposed convolutions, which
sequence_layers writes as `conv_general_dilated` with `lhs_dilation` (the input
spread out with zeros). XLA's CPU backend has no fast kernel for that form: on the
2-core dev box the decoder's 4x4 stride-2x2 layer, 42 MFLOP of real work, took
15 ms a frame (3 GFLOP/s), and the transposed layers were two thirds of the
decoder. Written instead as what a transposed convolution is, every input pixel
times the kernel (one matmul over channels) added into the output at its strided
offset, the same layer is an ordinary GEMM and a fused loop of pads and adds.

`without_lhs_dilation(fn)` traces `fn` and evaluates its jaxpr with every such
convolution replaced; everything else is bound as traced. It is applied to the
whole engine step rather than patched into sequence_layers, so upstream's own
modules (and the parity tests that run them) stay untouched.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax import lax
from jax.extend import core
from jax.extend.core.primitives import conv_general_dilated_p, jit_p


def transposed_conv(
    lhs: jax.Array,
    rhs: jax.Array,
    *,
    padding: Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int],
    rhs_dilation: Sequence[int],
    dimension_numbers: lax.ConvDimensionNumbers,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
    """`conv_general_dilated` with unit window strides and one feature group,
    computed without dilating the input.

    Output position o of a dilated convolution gathers x[i] * w[k] wherever
    lo + s*i == o + d*k, so each tap k of the kernel places the products of all
    inputs at lo - d*k + s*i: one `lax.pad` with interior s-1 per tap.
    """
    lhs_spec, rhs_spec, out_spec = dimension_numbers
    # Canonical layouts: lhs [N, S..., C], rhs [K..., I, O].
    x = lax.transpose(lhs, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))
    w = lax.transpose(rhs, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))
    spatial = len(lhs_spec) - 2
    kernel = w.shape[:spatial]
    taps_total = math.prod(kernel)
    # One [C, O] matrix per tap, batched: [T, M, C] x [T, C, O] -> [T, M, O]. Taps
    # lead because that is the kernel's own memory order (no weight transpose).
    rows = x.reshape(-1, x.shape[-1])
    rows = lax.broadcast(rows, (taps_total,))
    per_tap = w.reshape(taps_total, *w.shape[spatial:])
    products = lax.dot_general(
        rows, per_tap, (((2,), (1,)), ((0,), (0,))),
        precision=precision, preferred_element_type=preferred_element_type,
    )
    products = products.reshape(*kernel, *x.shape[:-1], w.shape[-1])
    out = None
    for taps in itertools.product(*(range(k) for k in kernel)):
        tap = products[taps]
        config = [(0, 0, 0)]
        for k, size, (lo, hi), s, d in zip(
            taps, kernel, padding, lhs_dilation, rhs_dilation, strict=True
        ):
            reach = (size - 1) * d + 1
            config.append((lo - d * k, hi - reach + 1 + d * k, s - 1))
        config.append((0, 0, 0))
        placed = lax.pad(tap, lax.convert_element_type(0, tap.dtype), config)
        out = placed if out is None else out + placed
    # Back from [N, S..., O] to the caller's output layout.
    canonical = (out_spec[0], *out_spec[2:], out_spec[1])
    return lax.transpose(out, tuple(canonical.index(axis) for axis in range(spatial + 2)))


# Below this many kernel channel pairs (in x out) a layer is no real matmul: the
# tiny variant's 4-16 channel layers gained nothing rewritten (its step stayed within
# run-to-run noise, at best 5-10% slower), so they are left as traced.
MIN_CHANNEL_PAIRS = 1024


def _rewritable(params: dict[str, Any], kernel: core.ShapedArray, min_pairs: int) -> bool:
    _, rhs_spec, _ = params["dimension_numbers"]
    return (
        kernel.shape[rhs_spec[0]] * kernel.shape[rhs_spec[1]] >= min_pairs
        and any(s != 1 for s in params["lhs_dilation"])
        and all(s == 1 for s in params["window_strides"])
        and params["feature_group_count"] == 1
        and params["batch_group_count"] == 1
    )


def _rewrite_conv(lhs: jax.Array, rhs: jax.Array, **params: Any) -> jax.Array:
    return transposed_conv(
        lhs, rhs,
        padding=params["padding"],
        lhs_dilation=params["lhs_dilation"],
        rhs_dilation=params["rhs_dilation"],
        dimension_numbers=params["dimension_numbers"],
        precision=params["precision"],
        preferred_element_type=params["preferred_element_type"],
    )


def _evaluate(
    jaxpr: core.Jaxpr, consts: Sequence[Any], min_pairs: int, *args: Any
) -> list[Any]:
    """Evaluates a jaxpr, rewriting lhs-dilated convolutions, inlining nested jits."""
    env: dict[core.Var, Any] = {}

    def read(v: Any) -> Any:
        return v.val if isinstance(v, core.Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        if eqn.primitive is conv_general_dilated_p and _rewritable(
            eqn.params, eqn.invars[1].aval, min_pairs
        ):
            outvals = [_rewrite_conv(*invals, **eqn.params)]
        elif eqn.primitive is jit_p:
            inner = eqn.params["jaxpr"]
            outvals = _evaluate(inner.jaxpr, inner.consts, min_pairs, *invals)
        else:
            with eqn.ctx.manager:
                outvals = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
            if not eqn.primitive.multiple_results:
                outvals = [outvals]
        env.update(zip(eqn.outvars, outvals, strict=True))
    return [read(v) for v in jaxpr.outvars]


def without_lhs_dilation(
    fn: Callable[..., Any], min_channel_pairs: int = MIN_CHANNEL_PAIRS
) -> Callable[..., Any]:
    """`fn` with its transposed convolutions of at least `min_channel_pairs`
    (input x output channels) computed by `transposed_conv`.

    Convolutions inside control flow (scan, cond) are left as they are; the codec
    decoder has none there.
    """

    @functools.wraps(fn)
    def rewritten(*args: Any) -> Any:
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        out = _evaluate(closed.jaxpr, closed.consts, min_channel_pairs, *jax.tree.leaves(args))
        return jax.tree.unflatten(jax.tree.structure(out_shape), out)

    return rewritten
