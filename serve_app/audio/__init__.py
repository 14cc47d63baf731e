"""Audio in and out: WAV encoding (decoding, resampling and loudness come with loops)."""

from .wav import to_float, to_int16, to_wav_bytes, write_wav

__all__ = ["to_float", "to_int16", "to_wav_bytes", "write_wav"]
