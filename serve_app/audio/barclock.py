"""Exact bar arithmetic: where bars start, in samples, at any tempo and rate.

Seconds per bar is kept as a Fraction (the BPM is read from its decimal string, so
93.7 BPM is 937/10, not a binary float). Bar k starts at round(k * spb * rate):
rounding each boundary from the origin, never accumulating per-bar lengths, is what
keeps a jam of any length on the grid.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

from ..frames import FRAME_SAMPLES, FRAMES_PER_SECOND, SAMPLE_RATE


def _round(x: Fraction) -> int:
    """Round half up, the same at every call (Python's round() is half-to-even)."""
    return math.floor(x + Fraction(1, 2))


@dataclasses.dataclass(frozen=True)
class BarClock:
    bpm: float
    beats_per_bar: int = 4

    def __post_init__(self) -> None:
        if not (isinstance(self.bpm, int | float) and math.isfinite(self.bpm) and self.bpm > 0):
            raise ValueError(f"bpm: must be a positive number, got {self.bpm!r}")
        if not 1 <= self.beats_per_bar <= 32:
            raise ValueError(f"beats_per_bar: must be within 1..32, got {self.beats_per_bar}")

    @property
    def seconds_per_bar(self) -> Fraction:
        return Fraction(self.beats_per_bar * 60) / Fraction(str(self.bpm))

    def boundary(self, bars: int | Fraction, rate: int = SAMPLE_RATE) -> int:
        """The sample at which bar number `bars` starts (bar 0 starts at 0)."""
        return _round(bars * self.seconds_per_bar * rate)

    def first_frame(self, bar: int) -> int:
        """The 40 ms frame in which bar number `bar` starts (a bar chunk's `first_frame`)."""
        return int(bar * self.seconds_per_bar * FRAMES_PER_SECOND)

    def samples(self, bars: int, rate: int = SAMPLE_RATE) -> int:
        """Length of `bars` bars from the origin: round(bars * spb * rate)."""
        return self.boundary(bars, rate)

    def frames_to_cover(self, bars: int) -> int:
        """Whole 40 ms frames needed to produce `bars` bars at 48 kHz."""
        return -(-self.boundary(bars) // FRAME_SAMPLES)

    def bars_in(self, samples: int, rate: int = SAMPLE_RATE) -> int:
        """Whole bars closest to a length in samples (at least one): a loop's bar count."""
        return max(1, _round(Fraction(samples) / (self.seconds_per_bar * rate)))
