"""A synthetic loop, so that benchmarks and tests can jam on a loop without audio files."""

from __future__ import annotations

import numpy as np


def synth_loop(seconds: float = 4.0, rate: int = 44100, bpm: float = 120.0,
               level: float = 0.02) -> np.ndarray:
    """A kick-and-tone loop, mono float32: a decaying 55 Hz thump on every beat over a
    quiet chord."""
    t = np.arange(int(seconds * rate)) / rate
    beat = 60.0 / bpm
    kick = np.exp(-(t % beat) * 18) * np.sin(2 * np.pi * 55 * t)
    chord = sum(np.sin(2 * np.pi * f * t) for f in (220, 277.2, 329.6)) / 3
    return (level * (kick + 0.4 * chord)).astype(np.float32)
