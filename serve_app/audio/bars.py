"""Bar-aligned chunks from a stream of 40 ms frames (bar-mode jams).

Frames never line up with bars (a bar at 93.7 BPM is 122,935.9... samples), so
frames go into a running buffer and chunk k is cut at exactly the samples where its
bars start and end, counted from the jam's origin (`BarClock.boundary`), at the
output rate. Resampling is one stateful soxr stream for the whole jam, so chunk
joins are as seamless as the 48 kHz stream; loudness gains ramp across joins.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import soxr

from ..frames import CHANNELS, SAMPLE_RATE
from .barclock import BarClock
from .loudness import LoudnessMatcher


@dataclasses.dataclass
class BarChunk:
    audio: np.ndarray  # int16 [n, 2] at `rate`
    first_bar: int
    bars: int
    rate: int
    loudness: dict | None


def to_int16(audio: np.ndarray) -> np.ndarray:
    return np.clip(np.round(audio * 32768.0), -32768, 32767).astype(np.int16)


class BarChunker:
    def __init__(self, clock: BarClock, bars_per_chunk: int, rate: int = SAMPLE_RATE,
                 loudness: LoudnessMatcher | None = None) -> None:
        if not 1 <= bars_per_chunk <= 64:
            raise ValueError(f"bars_per_chunk: must be within 1..64, got {bars_per_chunk}")
        self.clock = clock
        self.bars_per_chunk = bars_per_chunk
        self.rate = rate
        self.loudness = loudness
        if loudness is not None:
            loudness.prepare(float(clock.seconds_per_bar))
        self._resampler = (None if rate == SAMPLE_RATE else
                           soxr.ResampleStream(SAMPLE_RATE, rate, CHANNELS, dtype="float32",
                                               quality="VHQ"))
        self._buffer = np.zeros((0, CHANNELS), np.float32)
        self._buffer_start = 0  # output-rate sample index of _buffer[0]
        self._last_gain_db: float | None = None
        self.chunks = 0

    def _edges(self, chunk: int) -> list[int]:
        first = chunk * self.bars_per_chunk
        return [self.clock.boundary(first + j, self.rate)
                for j in range(self.bars_per_chunk + 1)]

    def feed(self, frame: np.ndarray) -> list[BarChunk]:
        """Adds one int16 frame [1920, 2]; returns the chunks it completed (usually none)."""
        audio = frame.astype(np.float32) / 32768.0
        if self._resampler is not None:
            audio = self._resampler.resample_chunk(audio)
        self._buffer = np.concatenate([self._buffer, audio])
        done = []
        while True:
            edges = self._edges(self.chunks)
            if self._buffer_start + self._buffer.shape[0] < edges[-1]:
                return done
            a, b = edges[0] - self._buffer_start, edges[-1] - self._buffer_start
            audio = self._buffer[a:b]
            self._buffer = self._buffer[b:]
            self._buffer_start = edges[-1]
            report = None
            if self.loudness is not None:
                audio, report = self.loudness.apply(audio, [e - edges[0] for e in edges[:-1]],
                                                    start_gain_db=self._last_gain_db)
                self._last_gain_db = (report.get("bar_gains_db") or [None])[-1]
            done.append(BarChunk(to_int16(audio), self.chunks * self.bars_per_chunk,
                                 self.bars_per_chunk, self.rate, report))
            self.chunks += 1

    def chunk_of_sample(self, sample_48k: int) -> int:
        """The chunk a 48 kHz sample position falls in."""
        bar_samples = self.clock.seconds_per_bar * SAMPLE_RATE * self.bars_per_chunk
        return int(sample_48k // bar_samples)
