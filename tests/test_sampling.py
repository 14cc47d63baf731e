"""Our sort-free depth sampler against upstream's, token for token."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from serve_app.engine.batch import _gather_rows
from serve_app.engine.conditioning import DEFAULT_CFG, build_block
from serve_app.engine.model import StreamingModel, build_sampler
from serve_app.engine.sampling import kth_largest_mask


@pytest.mark.parametrize("k", [1, 2, 40, 333, 1023, 1024, 5000])
def test_kth_largest_mask_matches_a_sort(k):
    x = np.array(jax.random.normal(jax.random.PRNGKey(k), (3, 1, 1024)))
    x[1, 0, :200] = 0.5  # ties straddling the threshold
    x[2, 0, :10] = -0.0  # negative zero equals zero
    x[2, 0, 10:20] = 0.0
    mask = np.asarray(kth_largest_mask(jnp.asarray(x), jnp.full((3, 1), k)))
    kth = np.sort(x, axis=-1)[..., -min(k, 1024)][..., None]
    np.testing.assert_array_equal(mask, x >= kth)


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
