"""Our sort-free depth sampler against upstream's, token for token."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from serve_app.engine.batch import _gather_rows
from serve_app.engine.conditioning import DEFAULT_CFG, build_block
from serve_app.engine.model import StreamingModel, build_sampler
from serve_app.engine.sampling import first_argmax, kth_largest_mask, level_gumbel


@pytest.mark.parametrize("bits_per_pass", [1, 4])
@pytest.mark.parametrize("k", [1, 2, 40, 333, 1023, 1024, 5000])
def test_kth_largest_mask_matches_a_sort(k, bits_per_pass):
    x = np.array(jax.random.normal(jax.random.PRNGKey(k), (3, 1, 1024)), np.float32)
    x[1, 0, :200] = 0.5  # ties straddling the threshold
    x[2, 0, :10] = -0.0  # negative zero equals zero
    x[2, 0, 10:20] = 0.0
    mask = np.asarray(kth_largest_mask(jnp.asarray(x), jnp.full((3, 1), k), bits_per_pass))
    kth = np.sort(x, axis=-1)[..., -min(k, 1024)][..., None]
    np.testing.assert_array_equal(mask, x >= kth)


def test_kth_largest_mask_widens_narrow_floats_and_refuses_float64():
    """bfloat16 logits (a bfloat16 step) widen exactly; float64 (under
    `jax_enable_x64`) does not fit the 32-bit keys: a clear error, not a wrong mask."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 1, 1024)).astype(jnp.bfloat16)
    k = jnp.array([[7], [300]])
    wide = np.asarray(x.astype(jnp.float32))
    kth = np.array([np.sort(wide[0, 0])[-7], np.sort(wide[1, 0])[-300]])[:, None, None]
    expected = wide >= kth
    np.testing.assert_array_equal(np.asarray(kth_largest_mask(x, k)), expected)
    with jax.enable_x64(True), pytest.raises(TypeError, match=r"logits: .* got float64"):
        kth_largest_mask(jnp.zeros((1, 1, 8), jnp.float64), jnp.array([[2]]))


def _tokens(state) -> np.ndarray:
    return np.asarray(state[0][1].values)  # the frame of codes the sampler just emitted


@pytest.mark.parametrize("batch", [1, 3])
def test_fast_sampler_emits_upstreams_tokens(tiny, batch):
    """Same weights, states, conditioning, per-row temperature and top-k: the codes
    sampled by FastMultivariateDecoder equal upstream MultivariateDecoder's."""
    fast = tiny.model
    upstream = StreamingModel(
        fast.variant,
        build_sampler(fast.variant, compute_dtype=jnp.float32, fast_sampling=False),
        fast.restored_params(),
        tune_for_cpu=False,
    )
    rng = np.random.default_rng(batch)
    style = tiny.style.tokenize(tiny.style.embed_text("upstream parity"))
    notes = np.full(128, -1, np.int32)
    notes[60] = 2
    tokens = np.stack([build_block(style, notes, 1, DEFAULT_CFG)] * batch)
    temperature = rng.uniform(0.5, 1.5, batch).astype(np.float32)
    top_k = rng.integers(1, 400, batch).astype(np.int32)
    ours = _gather_rows(fast.state_at(3), np.zeros(batch, np.int32))
    theirs = _gather_rows(fast.state_at(3), np.zeros(batch, np.int32))
    active, force = np.ones(batch, bool), np.zeros(batch, bool)
    forced = np.zeros((batch, 12), np.int32)
    for _ in range(6):
        _, _, ours = fast.step(fast.weights, tokens, temperature, top_k, active, forced, force,
                               ours)
        _, _, theirs = upstream.step(upstream.weights, tokens, temperature, top_k, active,
                                     forced, force, theirs)
        np.testing.assert_array_equal(_tokens(ours), _tokens(theirs))


@pytest.mark.parametrize("shape", [(1, 12294), (3, 4100), (2, 3, 1030)])
def test_level_noise_is_upstreams_noise_bit_for_bit(shape):
    """`level_gumbel` draws only a level's ids, but each one's noise is exactly what
    `random.gumbel` over the whole vocabulary gives it, for every row's own key."""
    rng = jax.vmap(jax.random.PRNGKey)(jnp.array([0, 7, 2**31 + 5, 2**32 - 1], jnp.uint32))
    rng = jax.vmap(jax.random.fold_in)(rng, jnp.arange(4))  # keys of two full words
    whole = jax.vmap(lambda key: jax.random.gumbel(key, shape, jnp.float32))(rng)
    vocab = shape[-1]
    for valid in [(0, 1024), (6, 1030), (vocab - 1024, vocab)]:
        ours = level_gumbel(rng, shape, valid)
        np.testing.assert_array_equal(
            np.asarray(ours).view(np.uint32),
            np.asarray(whole[..., valid[0]:valid[1]]).view(np.uint32))


def test_level_noise_follows_jax_where_it_draws_otherwise():
    """With JAX's older threefry bits (not per index), the noise is still JAX's own."""
    rng = jax.vmap(jax.random.PRNGKey)(jnp.arange(2))
    with jax.threefry_partitionable(False):
        whole = jax.vmap(lambda key: jax.random.gumbel(key, (1, 2048), jnp.float32))(rng)
        ours = level_gumbel(rng, (1, 2048), (1024, 2048))
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(whole[..., 1024:]))


def test_first_argmax_is_jnp_argmax_with_ties_and_nans():
    x = np.array(jax.random.normal(jax.random.PRNGKey(3), (5, 1, 1024)), np.float32)
    x[1, 0, [7, 300, 900]] = 9.0  # a tie for the largest: the first wins
    x[2, 0, [40, 41]] = np.nan  # a NaN counts as the largest: the first NaN
    x[2, 0, 10] = np.inf
    x[3, 0, :] = -0.0
    x[3, 0, 512] = 0.0  # equal to -0.0: index 0 stays first
    x[4, 0, :] = -np.inf
    np.testing.assert_array_equal(np.asarray(first_argmax(jnp.asarray(x))),
                                  np.asarray(jnp.argmax(jnp.asarray(x), axis=-1)))


def test_level_noise_hashes_only_the_levels_ids():
    """What makes it cheap: the threefry hash runs over the level's 1,024 ids per row,
    not over the 12,294-id vocabulary."""
    rng = jax.vmap(jax.random.PRNGKey)(jnp.arange(3))
    jaxpr = jax.make_jaxpr(lambda r: level_gumbel(r, (1, 12294), (6, 1030)))(rng)

    def hashed(jaxpr):  # the output shapes of every threefry hash, nested jits included
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "threefry2x32":
                yield eqn.outvars[0].aval.shape
            for param in eqn.params.values():
                inner = getattr(param, "jaxpr", None)
                if inner is not None and hasattr(inner, "eqns"):
                    yield from hashed(inner)

    assert list(hashed(jaxpr.jaxpr)) == [(3, 1, 1024)]
