"""Sample-rate conversion with soxr, to an exact number of samples."""

from __future__ import annotations

import numpy as np
import soxr

from ..frames import SAMPLE_RATE
from .wav import to_float, to_int16

MIN_RATE, MAX_RATE = 8_000, 192_000


def check_rate(rate: int, field: str = "target_sample_rate") -> int:
    if not MIN_RATE <= rate <= MAX_RATE:
        raise ValueError(f"{field}: must be within {MIN_RATE}..{MAX_RATE} Hz, got {rate}")
    return rate


def fit_length(audio: np.ndarray, samples: int) -> np.ndarray:
    if audio.shape[0] >= samples:
        return audio[:samples]
    pad = np.zeros((samples - audio.shape[0], *audio.shape[1:]), audio.dtype)
    return np.concatenate([audio, pad])


def resample(audio: np.ndarray, rate: int, samples: int) -> np.ndarray:
    """48 kHz int16 [n, 2] -> float32 in [-1, 1] at `rate`, exactly `samples` long."""
    floats = to_float(audio)
    if rate != SAMPLE_RATE:
        floats = soxr.resample(floats, SAMPLE_RATE, rate, "VHQ")
    return fit_length(floats, samples)


def resample_int16(audio: np.ndarray, rate: int, samples: int) -> np.ndarray:
    """48 kHz int16 [n, 2] -> int16 at `rate`, exactly `samples` long."""
    if rate == SAMPLE_RATE:
        return fit_length(audio, samples)
    return to_int16(resample(audio, rate, samples))
