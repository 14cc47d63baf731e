"""The CPU rewrites compute what the step computes as traced (cpu_tuning)."""

from __future__ import annotations

import gc
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from serve_app.engine.conv_transpose import without_lhs_dilation
from serve_app.engine.model import (
    CONDITIONING_TOKENS,
    StreamingModel,
    build_sampler,
    neutral_step_inputs,
    random_params,
)
from serve_app.engine.session import CODE_LEVELS
from serve_app.engine.weight_layout import WeightLayout

CONVS = [
    # lhs shape, rhs shape, padding, lhs_dilation, rhs_dilation, dimension numbers
    ((2, 3, 5, 8), (4, 4, 8, 6), ((3, 3), (1, 2)), (2, 2), (1, 1), ("NHWC", "HWIO", "NHWC")),
    ((1, 2, 7, 4), (3, 6, 4, 5), ((2, 0), (4, 3)), (1, 3), (1, 1), ("NHWC", "HWIO", "NHWC")),
    ((2, 4, 6, 3), (3, 3, 3, 5), ((0, 0), (1, 1)), (2, 1), (2, 1), ("NHWC", "HWIO", "NHWC")),
    ((2, 5, 3), (5, 3, 4), ((-1, 2),), (3,), (1,), ("NWC", "WIO", "NWC")),
    ((2, 3, 6, 5), (4, 3, 3, 2), ((1, 1), (2, 2)), (2, 2), (1, 1), ("NCHW", "OIHW", "NCHW")),
]


@pytest.mark.parametrize("lhs,rhs,padding,lhs_dilation,rhs_dilation,layout", CONVS)
def test_transposed_conv_matches_xla(lhs, rhs, padding, lhs_dilation, rhs_dilation, layout):
    rng = np.random.default_rng(len(lhs) + sum(lhs))
    x = jnp.asarray(rng.normal(size=lhs), jnp.float32)
    w = jnp.asarray(rng.normal(size=rhs), jnp.float32)

    def conv(x, w):
        return lax.conv_general_dilated(
            x, w, (1,) * len(lhs_dilation), padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=layout,
        )

    rewritten = without_lhs_dilation(conv, min_channel_pairs=0)
    assert "lhs_dilation" not in str(jax.make_jaxpr(rewritten)(x, w))
    np.testing.assert_allclose(jax.jit(rewritten)(x, w), conv(x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strides,lhs_dilation,channels", [
    ((2,), (1,), 64),  # a strided (encoder-like) convolution
    ((1,), (2,), 16),  # a transposed one too small to be a real matmul
])
def test_other_convs_are_left_alone(strides, lhs_dilation, channels):
    x, w = jnp.ones((1, 8, channels)), jnp.ones((3, channels, channels))

    def conv(x, w):
        return lax.conv_general_dilated(x, w, strides, [(0, 0)], lhs_dilation=lhs_dilation,
                                        dimension_numbers=("NWC", "WIO", "NWC"))

    assert str(jax.make_jaxpr(without_lhs_dilation(conv))(x, w)) == str(jax.make_jaxpr(conv)(x, w))


def test_layout_stores_weights_the_way_their_dots_read_them():
    w = {"proj": jnp.arange(24.0).reshape(2, 3, 4), "kept": jnp.ones((4, 5)), "bias": jnp.ones(5)}

    def fn(p, x):  # x[..., n, h] . proj[d, n, h]: proj is read as [h, n, d]
        y = jnp.einsum("bnh,dnh->bd", x, p["proj"]) @ jnp.ones((2, 4))
        return y @ p["kept"] + p["bias"]

    x = jnp.ones((1, 3, 4))
    layout = WeightLayout.of(fn, w, x)
    assert layout.perms == {2: (2, 1, 0)}  # leaves in key order: bias, kept, proj
    prepared = layout.prepare(w)
    assert prepared["proj"].shape == (4, 3, 2) and prepared["kept"] is w["kept"]
    np.testing.assert_array_equal(layout.restore(prepared)["proj"], w["proj"])
    np.testing.assert_allclose(
        jax.jit(lambda p, x: fn(layout.restore(p), x))(prepared, x), fn(w, x))
    with pytest.raises(ValueError, match="weights: tree differs"):
        layout.prepare({"proj": w["proj"]})


def test_weights_a_step_only_narrows_are_stored_narrow():
    """A float32 weight whose every use is a conversion to bfloat16 is stored as
    bfloat16; one also used as float32, or converted to two dtypes, stays as it is. The
    compiled step takes the narrow array and converts it no more, with the same result."""
    rng = np.random.default_rng(0)
    w = {name: jnp.asarray(rng.normal(size=(4, 4)), jnp.float32)
         for name in ("narrowed", "also_wide", "two_ways")}

    def fn(p, x):
        bf = lambda a: a.astype(jnp.bfloat16)  # noqa: E731
        y = bf(x) @ bf(p["narrowed"]) @ bf(p["narrowed"]).T
        z = x @ p["also_wide"] + x @ bf(p["also_wide"]).astype(jnp.float32)
        t = x @ (bf(p["two_ways"]).astype(jnp.float32) + p["two_ways"].astype(jnp.float16))
        return y.astype(jnp.float32) + z + t

    x = jnp.asarray(rng.normal(size=(2, 4)), jnp.float32)
    layout = WeightLayout.of(fn, w, x, permute=False)
    # leaves in key order: also_wide, narrowed, two_ways
    assert layout.casts == {1: (np.dtype(jnp.bfloat16), np.dtype(np.float32))}
    assert WeightLayout.of(fn, w, x, permute=False, narrow=False).changes_nothing
    # another function reading the same weights holds back what it reads otherwise
    narrows_too = (lambda p, x: x @ p["narrowed"].astype(jnp.bfloat16), (x.astype(jnp.bfloat16),))
    reads_wide = (lambda p, x: x @ p["narrowed"], (x,))
    assert WeightLayout.of(fn, w, x, permute=False, readers=[narrows_too]).casts == layout.casts
    assert WeightLayout.of(fn, w, x, permute=False, readers=[narrows_too, reads_wide]).casts == {}
    prepared = layout.prepare(w)
    assert prepared["narrowed"].dtype == jnp.bfloat16 and prepared["also_wide"] is w["also_wide"]
    step = jax.jit(lambda p, x: fn(layout.restore(p), x))
    np.testing.assert_array_equal(step(prepared, x), jax.jit(fn)(w, x))

    def arguments(jitted, *args) -> str:  # the compiled program's parameter types
        text = jitted.lower(*args).compile().as_text()
        return text.split("entry_computation_layout={(", 1)[1].split(")", 1)[0]

    assert arguments(jax.jit(fn), w, x).count("f32[4,4]") == 3
    assert arguments(step, prepared, x).count("f32[4,4]") == 2
    assert arguments(step, prepared, x).count("bf16[4,4]") == 1


def test_a_bfloat16_model_keeps_one_narrow_copy_of_its_weights_and_plays_the_same(tiny):
    """tiny computing in bfloat16 (as accelerators do): most of its float32 weights are
    stored as bfloat16 (narrowed on the host when loaded there) and their float32 arrays
    are not kept; the step reads half the bytes and streams exactly what it streams
    converting them on every call, and a loop's prefill, reading the same narrow
    weights, leaves exactly the same state."""
    bf16 = build_sampler(tiny.variant, compute_dtype=jnp.bfloat16)
    wide = StreamingModel(tiny.variant, bf16, tiny.model.restored_params(),
                          narrow_weights=False)
    params = tiny.model.restored_params()  # arrays of its own
    narrow = StreamingModel(tiny.variant, bf16, params)
    leaves = jax.tree.leaves(params)
    assert len(narrow.layout.casts) > len(leaves) / 3
    assert not wide.layout.casts
    float32_arrays = [weakref.ref(leaves[i]) for i in narrow.layout.casts]
    del params, leaves
    gc.collect()
    assert [ref() for ref in float32_arrays] == [None] * len(float32_arrays)

    def nbytes(weights) -> int:
        return sum(w.nbytes for w in jax.tree.leaves(weights))

    assert nbytes(narrow.weights) < 0.6 * nbytes(wide.weights)
    # from the host (as a checkpoint loads): narrowed there, the same bits on the device
    host = StreamingModel(tiny.variant, bf16, jax.tree.map(np.asarray, wide.restored_params()))
    assert all(isinstance(w, jax.Array) for w in jax.tree.leaves(host.weights))
    jax.tree.map(np.testing.assert_array_equal, host.weights, narrow.weights)
    narrow_audio, narrow_codes = _stream(narrow, 4)
    audio, codes = _stream(wide, 4)
    np.testing.assert_array_equal(narrow_codes, codes)
    assert np.abs(audio).max() > 0
    np.testing.assert_array_equal(narrow_audio, audio)

    forced = np.random.default_rng(1).integers(0, 1024, (1, 3, CODE_LEVELS), np.int32)
    tokens = np.zeros((1, 3, CONDITIONING_TOKENS), np.int32)
    narrow_run, run = (m.prefill(m.weights, tokens, forced, m.state_at(3)) for m in (narrow, wide))
    assert np.abs(np.asarray(run[0])).max() > 0
    for got, want in zip(jax.tree.leaves(narrow_run), jax.tree.leaves(run), strict=True):
        np.testing.assert_array_equal(got, want)


def _stream(model: StreamingModel, frames: int, seeds=(3, 11)) -> tuple[np.ndarray, np.ndarray]:
    state = jax.tree.map(lambda *rows: jnp.concatenate(rows),
                         *(model.state_at(s) for s in seeds))
    audio, codes = [], []
    for _ in range(frames):
        a, c, state = model.step(model.weights, *neutral_step_inputs(len(seeds)), state)
        audio.append(np.asarray(a))
        codes.append(np.asarray(c))
    return np.concatenate(audio, axis=1), np.stack(codes)


@pytest.fixture(scope="module")
def untuned(tiny) -> StreamingModel:
    m = tiny.model
    return StreamingModel(m.variant, m.sampler, m.restored_params(), tune_for_cpu=False)


def test_tiny_streams_the_same_tuned_and_untuned(tiny, untuned):
    """Two sessions, 6 frames (the decoder's lookahead makes the first one silent):
    the same codes, and audio within one int16 step of the untuned step's."""
    assert tiny.model.tune_for_cpu and not untuned.tune_for_cpu
    tuned_audio, tuned_codes = _stream(tiny.model, 6)
    audio, codes = _stream(untuned, 6)
    np.testing.assert_array_equal(tuned_codes, codes)
    assert np.abs(audio).max() > 0  # not a comparison of silences
    np.testing.assert_allclose(tuned_audio.astype(int), audio.astype(int), atol=1)


def test_hot_swapped_weights_are_prepared_again(tiny, untuned):
    """with_params re-lays-out the new weights: a swapped tuned model streams what an
    untuned model with those weights streams."""
    other = random_params(tiny.model.sampler, seed=5)
    swapped = tiny.model.with_params(other)
    assert swapped.step is tiny.model.step  # nothing recompiles
    tuned_audio, tuned_codes = _stream(swapped, 4)
    audio, codes = _stream(untuned.with_params(other), 4)
    np.testing.assert_array_equal(tuned_codes, codes)
    np.testing.assert_allclose(tuned_audio.astype(int), audio.astype(int), atol=1)
