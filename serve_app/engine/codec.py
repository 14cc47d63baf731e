"""The SpectroStream encoder: 48 kHz stereo audio -> the model's RVQ codes.

Generation only needs the decoder (inside the sampler checkpoint). Audio input
(jamming on a loop) needs the encoder, shipped separately as
`resources/spectrostream/encoder.safetensors`, plus the quantizer codebooks that
the sampler checkpoint already holds.
"""

from __future__ import annotations

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import sequence_layers.jax as sl
from magenta_rt.jax import spectrostream

from . import weights
from .model import Params
from .run_once import run_once
from .variants import CHANNELS, FRAME_SAMPLES, Variant

ENCODER_PREFIX = "params/encoder/"


def _codec(variant: Variant) -> spectrostream.SpectroStream:
    return variant.codec_config().make()


def _dummy_audio() -> sl.Sequence:
    return sl.Sequence.from_values(jnp.zeros((1, 2 * FRAME_SAMPLES, CHANNELS), jnp.float32))


def _all_codec_vars(codec, rngs, audio):
    return nn.unbox(codec.init(rngs, audio, training=False))


def expected_encoder_shapes(variant: Variant) -> Params:
    codec = _codec(variant)
    rngs = {"params": jax.random.PRNGKey(0)}
    tree = jax.eval_shape(lambda r: _all_codec_vars(codec, r, _dummy_audio()), rngs)
    return tree["params"]["encoder"]


def random_encoder_params(variant: Variant, seed: int) -> Params:
    codec = _codec(variant)
    rngs = {"params": jax.random.PRNGKey(seed)}
    tree = run_once(lambda r: _all_codec_vars(codec, r, _dummy_audio()), rngs)
    return {"params": {"encoder": tree["params"]["encoder"]}}


class AudioEncoder:
    """Encodes waveforms to codes with the variant's SpectroStream encoder."""

    @classmethod
    def from_file(cls, variant: Variant, encoder_path: pathlib.Path,
                  quantizer: Params) -> AudioEncoder:
        encoder = jax.device_put(weights.load(
            encoder_path, expected_encoder_shapes(variant), prefix=ENCODER_PREFIX
        ))
        return cls(variant, encoder, quantizer)

    @classmethod
    def random(cls, variant: Variant, seed: int, quantizer: Params) -> AudioEncoder:
        """Random encoder weights: loop prefill costs the same whatever the weights, so a
        benchmark with random weights can measure it too."""
        encoder = jax.device_put(weights.random_like(expected_encoder_shapes(variant), seed))
        return cls(variant, encoder, quantizer)

    def __init__(self, variant: Variant, encoder: Params, quantizer: Params):
        """`encoder`: the codec's encoder parameters; `quantizer`, which turns its
        embeddings into codes, is the sampler checkpoint's own (`StreamingModel.codebooks`)."""
        self.variant = variant
        self._codec = _codec(variant)
        self._params = {"params": {"encoder": encoder, "quantizer": quantizer}}
        codec = self._codec
        levels = variant.rvq_levels

        def encode(params, audio):
            codes = codec.apply(
                params, sl.Sequence.from_values(audio), training=False,
                method=codec.waveform_to_codes,
            )
            return codes.values[..., :levels]

        self._encode = jax.jit(encode)

    def encode(self, audio: np.ndarray) -> np.ndarray:
        """[n, 2] float32 in [-1, 1] at 48 kHz, n a multiple of 1920 -> [n/1920, 12] int32."""
        if audio.ndim != 2 or audio.shape[1] != CHANNELS or audio.shape[0] % FRAME_SAMPLES:
            raise ValueError(
                f"audio: expected [k*{FRAME_SAMPLES}, {CHANNELS}] samples, got {audio.shape}"
            )
        codes = self._encode(self._params, jnp.asarray(audio, jnp.float32)[None])
        return np.asarray(codes[0], np.int32)
