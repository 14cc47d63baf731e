"""Depth sampling that gives the same tokens as upstream with a fraction of its work.

Upstream's `MultivariateDecoder.step_with_emits` samples each RVQ level from the
whole 12,294-entry vocabulary although only the 1,024 codes of the current level
can be drawn: it sorts all of it for top-k (12 sorts per frame, ~95% of a tiny
model's CPU step) and draws Gumbel noise for all of it (12 times the hashing a
level needs, a fifth of a 16-row tiny step after the sorts were gone).
`FastMultivariateDecoder` keeps every layer, parameter name and RNG stream of
upstream and works on the level's 1,024 ids alone: an exact radix select finds the
k-th largest logit (`kth_largest_mask`), and each id's noise is drawn from its own
index in upstream's stream (`level_gumbel`). The sampled tokens are therefore
identical to upstream's (tests/test_sampling.py checks it).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import sequence_layers.jax as sl
from jax import lax, random
from jax.extend.random import threefry2x32_p
from magenta_rt.jax import depthformer

from . import device


def _order_preserving_uint32(x: jax.Array) -> jax.Array:
    """Maps float32 to uint32 so that unsigned comparison matches float comparison.
    Narrower floats widen exactly; float64 (logits under `jax_enable_x64`) would not
    fit the 32-bit keys and is refused rather than bitcast into wrong ones."""
    if not jnp.issubdtype(x.dtype, jnp.floating) or jnp.finfo(x.dtype).bits > 32:
        raise TypeError(f"logits: float32 or narrower expected, got {x.dtype}")
    x = x.astype(jnp.float32)
    x = jnp.where(x == 0, jnp.zeros_like(x), x)  # -0.0 and +0.0 compare equal
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    sign = bits >> 31
    return jnp.where(sign == 1, ~bits, bits | jnp.uint32(0x80000000))


def kth_largest_mask(logits: jax.Array, k: jax.Array, bits_per_pass: int = 1) -> jax.Array:
    """True where `logits` is >= the k-th largest value of its row (ties kept).

    Exact for any float32 input: the k-th largest key is built from the top,
    `bits_per_pass` bits at a time, each pass counting how many keys reach every
    prefix the next digit could make (vector compares instead of a sort). One bit a
    pass (32 passes, one compare each) is the fastest on XLA:CPU: 0.12 ms for 16 rows
    x 1,024 on the 2-core box, against 0.20 for 4 bits (8 passes of 16 candidates)
    and 1.7 for a sort. `k` has the batch shape of `logits` without the last axis
    and is clipped to [1, N] like upstream's top-k.
    """
    if 32 % bits_per_pass:
        raise ValueError(f"bits_per_pass: must divide 32, got {bits_per_pass}")
    keys = _order_preserving_uint32(logits)
    k = jnp.clip(k, 1, logits.shape[-1])[..., None]
    threshold = jnp.zeros((*logits.shape[:-1], 1), jnp.uint32)
    digits = jnp.arange(1, 1 << bits_per_pass, dtype=jnp.uint32)  # digit 0 always qualifies
    for shift in range(32 - bits_per_pass, -1, -bits_per_pass):
        candidates = threshold | (digits << shift)  # [..., digits]
        counts = jnp.sum(keys[..., None, :] >= candidates[..., :, None], axis=-1,
                         dtype=jnp.int32)
        # counts fall as the digit grows: the digit is how many candidates qualify.
        digit = jnp.sum(counts >= k, axis=-1, keepdims=True, dtype=jnp.uint32)
        threshold = threshold | (digit << shift)
    return keys >= threshold


def first_argmax(x: jax.Array) -> jax.Array:
    """`jnp.argmax(x, axis=-1)`, the same index for every input (ties: the first; a
    NaN counts as the largest), as plain reductions: XLA:CPU runs argmax's
    value-and-index reduction element by element (0.087 against 0.033 ms for 16 rows
    x 1,024 on the 2-core box)."""
    nan = jnp.isnan(x)
    largest = jnp.max(x, axis=-1, keepdims=True)
    hit = jnp.where(jnp.any(nan, axis=-1, keepdims=True), nan, x == largest)
    index = lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.min(jnp.where(hit, index, x.shape[-1]), axis=-1)


def _draws_by_index() -> bool:
    """True when JAX draws `random.gumbel` as `level_gumbel` assumes: threefry keys
    with partitionable bits (each element's bits a function of its key and its flat
    index alone; the default since JAX 0.5) and the default "low" gumbel mode."""
    return (
        jax.config.jax_threefry_partitionable
        and jax.config.jax_default_prng_impl == "threefry2x32"
        and not jax.config.jax_high_dynamic_range_gumbel
    )


def level_gumbel(rng: jax.Array, shape: tuple[int, ...], valid: tuple[int, int]) -> jax.Array:
    """`random.gumbel(key, shape)[..., lo:hi]` for each row's raw key in `rng` [B, 2],
    bit for bit, without drawing the rest of the vocabulary.

    Upstream draws noise for all 12,294 ids and uses the level's 1,024: twelve times
    the threefry hashing a level needs, which XLA:CPU runs as a loop per level (a
    fifth of a 16-row tiny step). Partitionable threefry makes element i's bits the
    xor of `threefry2x32(key, (0, i))`'s two words, so the slice is drawn from its own
    flat indices alone; the bits become floats exactly as JAX's `uniform(minval=tiny,
    maxval=1)` and `gumbel` make them. Where JAX is configured otherwise
    (`_draws_by_index`), the whole vocabulary is drawn and sliced, as before.
    """
    lo, hi = valid
    if not _draws_by_index() or math.prod(shape) >= 2**32 or rng.dtype != jnp.uint32:
        return jax.vmap(lambda key: random.gumbel(key, shape, jnp.float32))(rng)[..., lo:hi]
    lead = shape[:-1]
    width = (*lead, hi - lo)
    index = lax.broadcasted_iota(jnp.uint32, width, len(lead)) + jnp.uint32(lo)
    for axis in range(len(lead)):  # the flat index into `shape`
        stride = jnp.uint32(math.prod(shape[axis + 1:]))
        index = index + lax.broadcasted_iota(jnp.uint32, width, axis) * stride
    index = jnp.broadcast_to(index, (rng.shape[0], *width))
    k1, k2 = (jnp.broadcast_to(rng[:, i].reshape(-1, *(1,) * len(width)), index.shape)
              for i in (0, 1))
    bits1, bits2 = threefry2x32_p.bind(k1, k2, jnp.zeros_like(index), index)
    mantissa = lax.shift_right_logical(bits1 ^ bits2, jnp.uint32(32 - 23))
    one = np.array(1.0, np.float32).view(np.uint32)
    floats = lax.bitcast_convert_type(mantissa | one, jnp.float32) - jnp.float32(1.0)
    tiny = jnp.float32(np.finfo(np.float32).tiny)
    uniform = lax.max(tiny, floats * (jnp.float32(1.0) - tiny) + tiny)
    return -jnp.log(-jnp.log(uniform))


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
    to the top-k-masked logits), restricted to the level's valid id range. How the
    top-k threshold and the argmax are found depends on the backend: on the CPU the
    forms fastest there (one bit a pass, `first_argmax`); elsewhere the 4-bit select
    and XLA's argmax, fewer dependent kernels where a step's length is its chain of
    kernels (docs/performance.md; the CPU forms were not measured on a GPU).
    """
    cpu = device.on_cpu()
    lo, hi = valid
    noise = level_gumbel(rng, logits.shape[1:], valid)
    level_logits = logits[..., lo:hi]
    if top_k is not None:
        keep = kth_largest_mask(level_logits, jnp.broadcast_to(top_k[:, None], logits.shape[:2]),
                                bits_per_pass=1 if cpu else 4)
        large_negative = depthformer.get_large_negative_number(logits.dtype)
        level_logits = jnp.where(keep, level_logits, large_negative)
    scaled = noise * temperature.astype(logits.dtype)[:, None, None]
    noisy = level_logits + scaled
    return (first_argmax(noisy) if cpu else jnp.argmax(noisy, axis=-1)) + lo


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
