"""Depth sampling that gives the same tokens as upstream without a vocabulary sort.

Upstream's `MultivariateDecoder.step_with_emits` applies top-k by sorting the whole
12,294-entry vocabulary once per RVQ level (12 sorts per frame), although only the
1,024 codes of the current level can be sampled. On a CPU those sorts are ~95% of a
tiny model's step. `FastMultivariateDecoder` keeps every layer, parameter name, RNG
stream and the Gumbel noise of upstream and changes only how the k-th largest logit
is found: an exact radix select over the level's 1,024 valid logits. The sampled
tokens are therefore identical to upstream's (tests/test_sampling.py checks it).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import sequence_layers.jax as sl
from jax import random
from magenta_rt.jax import depthformer

_RADIX_BITS = 4


def _order_preserving_uint32(x: jax.Array) -> jax.Array:
    """Maps float32 to uint32 so that unsigned comparison matches float comparison."""
    x = jnp.where(x == 0, jnp.zeros_like(x), x)  # -0.0 and +0.0 compare equal
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    sign = bits >> 31
    return jnp.where(sign == 1, ~bits, bits | jnp.uint32(0x80000000))


def kth_largest_mask(logits: jax.Array, k: jax.Array) -> jax.Array:
    """True where `logits` is >= the k-th largest value of its row (ties kept).

    Exact for any float32 input: the k-th largest key is built 4 bits at a time,
    each pass counting how many keys reach 16 candidate prefixes at once (8 passes
    of vector compares instead of a sort). `k` has the batch shape of `logits`
    without the last axis and is clipped to [1, N] like upstream's top-k.
    """
    keys = _order_preserving_uint32(logits)
    k = jnp.clip(k, 1, logits.shape[-1])[..., None]
    threshold = jnp.zeros((*logits.shape[:-1], 1), jnp.uint32)
    digits = jnp.arange(1 << _RADIX_BITS, dtype=jnp.uint32)
    for shift in range(32 - _RADIX_BITS, -1, -_RADIX_BITS):
        candidates = threshold | (digits << shift)  # [..., 16]
        counts = jnp.sum(keys[..., None, :] >= candidates[..., :, None], axis=-1)
        # counts falls as the digit grows and digit 0 always qualifies.
        digit = jnp.sum(counts >= k, axis=-1, keepdims=True) - 1
        threshold = threshold | (digit.astype(jnp.uint32) << shift)
    return keys >= threshold


def sample_level(
    logits: jax.Array,
    *,
    valid: tuple[int, int],
    temperature: jax.Array,
    top_k: jax.Array | None,
    rng: jax.Array,
) -> jax.Array:
    """Samples one RVQ level for every row: [B, T, V] float32 logits -> [B, T] ids.

    Same arithmetic as upstream `_sample_categorical_with_temperature` (Gumbel noise
    over the full vocabulary from each row's own key, scaled by temperature, added
    to the top-k-masked logits), restricted to the level's valid id range.
    """
    lo, hi = valid
    noise = jax.vmap(lambda key: random.gumbel(key, logits.shape[1:], logits.dtype))(rng)
    level_logits = logits[..., lo:hi]
    if top_k is not None:
        keep = kth_largest_mask(level_logits, jnp.broadcast_to(top_k[:, None], logits.shape[:2]))
        large_negative = depthformer.get_large_negative_number(logits.dtype)
        level_logits = jnp.where(keep, level_logits, large_negative)
    scaled = noise[..., lo:hi] * temperature.astype(logits.dtype)[:, None, None]
    return jnp.argmax(level_logits + scaled, axis=-1) + lo


class FastMultivariateDecoder(depthformer.MultivariateDecoder):
    """Upstream's decoder with sort-free top-k and no emits (see module docstring)."""

    def step_with_emits(self, x, state, *, training, constants=None):
        del x  # the decoder feeds back its own previous frame, as upstream does
        constants = constants or {}
        if depthformer.get_prefixed_constants(
            constants, depthformer.CLASSIFIER_FREE_GUIDANCE_SCALE_CONSTANT
        ):
            raise NotImplementedError(
                "batch-doubling CFG is not used by Magenta RT 2; CFG rides in the tokens"
            )
        rng, previous_frame, temporal_state, step = state
        embedded = self.embedder(previous_frame, training=training)
        temporal_inputs = embedded.apply_values(jnp.mean, axis=-2)
        temporal_outputs, temporal_state = self.temporal_body.step(
            temporal_inputs, temporal_state, training=training, constants=constants
        )
        depth_state = self.depth_body.get_initial_state(
            batch_size=temporal_outputs.shape[0],
            input_spec=temporal_outputs.channel_spec,
            training=training,
        )
        temperature = constants[depthformer.TEMPERATURE_CONSTANT]
        top_k = constants.get(depthformer.TOP_K_CONSTANT)
        cap = self.config.soft_cap_logits
        depth_inputs = temporal_outputs
        samples = []
        for level in range(self.config.num_codebooks):
            logits, depth_state = self.depth_body.step(
                depth_inputs, depth_state, training=training
            )
            lo = self.config.num_reserved_tokens + level * self.config.codebook_size
            sample = logits.apply_values(
                lambda v, lo=lo, rng=rng: sample_level(
                    _soft_cap(v, cap).astype(jnp.float32),
                    valid=(lo, lo + self.config.codebook_size),
                    temperature=temperature,
                    top_k=top_k,
                    rng=rng,
                )
            ).mask_invalid()
            rng = jax.vmap(random.fold_in)(rng, step)
            samples.append(sample.values)
            depth_inputs = self.embedder(sample, training=training)
        frame = sl.Sequence.from_values(jnp.stack(samples, axis=-1))
        return frame, (rng, frame, temporal_state, step + 1), None


def _soft_cap(values: jax.Array, cap: float | None) -> jax.Array:
    return values if cap is None else jnp.tanh(values / cap) * cap


@dataclasses.dataclass(frozen=True)
class FastDecoderConfig(depthformer.MultivariateDecoder.Config):
    def make(self) -> FastMultivariateDecoder:
        return FastMultivariateDecoder(self, name=self.name)


def with_fast_sampling(
    config: depthformer.EncoderDecoder.Config,
) -> depthformer.EncoderDecoder.Config:
    """The same depthformer (same parameter tree) with `FastMultivariateDecoder`."""
    fields = {f.name: getattr(config.decoder, f.name) for f in dataclasses.fields(config.decoder)}
    return dataclasses.replace(config, decoder=FastDecoderConfig(**fields))
