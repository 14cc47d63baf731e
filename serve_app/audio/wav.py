"""Generated audio's sample format: int16 <-> float, and int16 frames to WAV files or bytes."""

from __future__ import annotations

import io
import pathlib

import numpy as np
import soundfile as sf

from ..frames import SAMPLE_RATE


def to_float(samples: np.ndarray) -> np.ndarray:
    """int16 -> float32 in [-1, 1): the model's int16 full scale is 32768."""
    return samples.astype(np.float32) / 32768.0


def to_int16(audio: np.ndarray) -> np.ndarray:
    """float -> int16, the inverse of `to_float`, rounded and clipped to the int16 range."""
    return np.clip(np.round(audio * 32768.0), -32768, 32767).astype(np.int16)


def to_wav_bytes(samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, sample_rate, format="WAV", subtype=_subtype(samples))
    return buf.getvalue()


def write_wav(path: pathlib.Path, samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), samples, sample_rate, format="WAV", subtype=_subtype(samples))


def _subtype(samples: np.ndarray) -> str:
    return "PCM_16" if samples.dtype == np.int16 else "FLOAT"
