"""Codes decoded all at once: the reference for where streamed audio belongs.

Decoded as one sequence (`codes_to_waveform`, sequence_layers' layer mode), frame k
of the audio is frame k's codes, by construction: that is how the codec was trained,
its lookahead included. Frame k needs frame k+1's codes to look ahead into, so n
frames of codes give n-1 frames of audio.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import sequence_layers.jax as sl
from magenta_rt.jax import system as upstream_system

from serve_app.engine import LoadedModel
from serve_app.engine.variants import CHANNELS, FRAME_SAMPLES


def decode_at_once(loaded: LoadedModel, codes: np.ndarray) -> np.ndarray:
    """int16 [n-1, 1920, 2] from codes [n, 12], converted as the streaming step does."""
    codec = loaded.variant.codec_config().make()
    params = {"params": loaded.model.restored_params()["params"]["soundstream"]}
    wave = codec.apply(params, sl.Sequence.from_values(jnp.asarray(codes)[None]),
                       training=False, method=codec.codes_to_waveform)
    audio = np.asarray(upstream_system._float_samples_to_int16(wave.values[0]))
    return audio.reshape(-1, FRAME_SAMPLES, CHANNELS)


def assert_heard_as_decoded(heard: np.ndarray, decoded: np.ndarray) -> None:
    """Streamed and decoded-at-once audio differ by float noise only (<= 2 LSB)."""
    assert heard.shape == decoded.shape, (heard.shape, decoded.shape)
    worst = np.abs(heard.astype(np.int32) - decoded.astype(np.int32)).max()
    assert worst <= 2, f"off by up to {worst} LSB: not the same frames"
