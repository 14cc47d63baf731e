"""Uploaded audio -> 48 kHz stereo float32, or a ValueError naming the field and why.

libsndfile (via soundfile) reads WAV, FLAC, OGG/Vorbis/Opus and, from 1.1 on, MP3;
soxr resamples. A loop is what the model continues, so uploads that cannot be a
loop are refused up front: empty, undecodable, all-silent, shorter than one model frame
(a 2 ms upload was tiled into a buzz and continued) or longer than allowed.
"""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf
import soxr

from ..frames import CHANNELS, FRAME_SAMPLES, SAMPLE_RATE

SILENCE_PEAK = 10 ** (-80 / 20)  # -80 dBFS: below this nothing audible is there
MIN_SECONDS = FRAME_SAMPLES / SAMPLE_RATE  # one frame, the least the model encodes


def decode_audio(data: bytes, *, max_seconds: float, field: str = "loop_audio") -> np.ndarray:
    """Decodes a whole file and returns float32 [n, 2] in [-1, 1] at 48 kHz."""
    if not data:
        raise ValueError(f"{field}: the upload is empty")
    try:
        info = sf.info(io.BytesIO(data))
        if info.frames and info.frames / info.samplerate > max_seconds:
            raise ValueError(f"{field}: {info.frames / info.samplerate:.1f} s is longer than "
                             f"the {max_seconds:g} s allowed")
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        reason = getattr(e, "error_string", None) or str(e)
        raise ValueError(f"{field}: could not decode the audio ({reason.rstrip('.')}); send "
                         "WAV, FLAC, OGG or MP3") from None
    if samples.shape[0] == 0:
        raise ValueError(f"{field}: the file holds no audio samples")
    seconds = samples.shape[0] / rate
    if seconds < MIN_SECONDS:
        raise ValueError(f"{field}: {seconds:.3g} s is shorter than one frame of the model "
                         f"({MIN_SECONDS:g} s); there is nothing to continue")
    if seconds > max_seconds:
        raise ValueError(f"{field}: {seconds:.1f} s is longer than the {max_seconds:g} s "
                         "allowed")
    if not np.isfinite(samples).all():
        raise ValueError(f"{field}: the audio holds NaN or infinite samples")
    if np.abs(samples).max() < SILENCE_PEAK:
        raise ValueError(f"{field}: the audio is silent (peak below -80 dBFS); there is "
                         "nothing to continue")
    return to_model_format(samples, rate)


def to_model_format(samples: np.ndarray, rate: int) -> np.ndarray:
    """Any channel count and rate -> stereo at 48 kHz (mono is duplicated, more than two
    channels are folded down by averaging into left/right pairs)."""
    if samples.shape[1] == 1:
        samples = np.repeat(samples, CHANNELS, axis=1)
    elif samples.shape[1] > CHANNELS:
        samples = np.stack([samples[:, 0::2].mean(axis=1), samples[:, 1::2].mean(axis=1)], 1)
    if rate != SAMPLE_RATE:
        samples = soxr.resample(samples, rate, SAMPLE_RATE, "VHQ")
    return np.clip(samples, -1.0, 1.0).astype(np.float32)
