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

from ..frames import CHANNELS, FRAME_SAMPLES, SAMPLE_RATE
from .barclock import BarClock
from .loudness import LoudnessMatcher
from .wav import to_float, to_int16


@dataclasses.dataclass
class BarCut:
    """Whole bars cut from the stream, not yet loudness-matched (float [n, 2] at `rate`)."""

    audio: np.ndarray
    bar_starts: list[int]  # sample offsets where its bars begin (the first is 0)
    first_bar: int
    bars: int


@dataclasses.dataclass
class BarChunk:
    audio: np.ndarray  # int16 [n, 2] at `rate`
    first_bar: int
    bars: int
    rate: int
    loudness: dict | None


class BarChunker:
    """Two halves, because they run in different places: `feed` cuts (cheap, once per
    frame, on the generator's step loop) and `finish` matches loudness (milliseconds per
    bar: in a worker, so that one session's long chunk never holds up every session's
    next step)."""

    def __init__(self, clock: BarClock, bars_per_chunk: int, rate: int = SAMPLE_RATE,
                 loudness: LoudnessMatcher | None = None, skip_samples: int = 0) -> None:
        """`skip_samples` (48 kHz) are dropped from the front of the stream: a bar-mode
        stream moved to another replica restarts on the frame line just before the bar
        line it stopped at, and the listener has heard the samples in between."""
        if not 1 <= bars_per_chunk <= 64:
            raise ValueError(f"bars_per_chunk: must be within 1..64, got {bars_per_chunk}")
        if not 0 <= skip_samples < FRAME_SAMPLES:
            raise ValueError(f"skip_samples: must be within 0..{FRAME_SAMPLES - 1}")
        self.skip_samples = skip_samples
        self._to_skip = skip_samples
        self.clock = clock
        self.bars_per_chunk = bars_per_chunk
        self.rate = rate
        self.loudness = loudness
        if loudness is not None:
            loudness.prepare(float(clock.seconds_per_bar))
        self._resampler = (None if rate == SAMPLE_RATE else
                           soxr.ResampleStream(SAMPLE_RATE, rate, CHANNELS, dtype="float32",
                                               quality="VHQ"))
        # Room for the growing chunk, made when it opens and filled frame by frame: a 50 s
        # chunk joined from its frames, or regrown each frame, copies megabytes at once.
        self._slack = 2 * (FRAME_SAMPLES * rate // SAMPLE_RATE + 64)  # soxr's uneven output
        self._last_gain_db: float | None = None
        self.chunks = 0
        self._open_chunk()

    def _edges(self, chunk: int) -> list[int]:
        first = chunk * self.bars_per_chunk
        return [self.clock.boundary(first + j, self.rate)
                for j in range(self.bars_per_chunk + 1)]

    def _open_chunk(self, carried: np.ndarray | None = None) -> None:
        """Makes room for chunk `self.chunks`, starting with the samples `carried` over."""
        self._chunk_edges = self._edges(self.chunks)
        length = self._chunk_edges[-1] - self._chunk_edges[0]
        self._buffer = np.empty((length + self._slack, CHANNELS), np.float32)
        self._filled = 0
        if carried is not None:
            self._append(carried)

    def _append(self, audio: np.ndarray) -> None:
        end = self._filled + audio.shape[0]
        if end > self._buffer.shape[0]:  # more than the slack at once: not seen, but safe
            self._buffer = np.concatenate([self._buffer[:self._filled], np.empty_like(audio),
                                           np.empty((self._slack, CHANNELS), np.float32)])
        self._buffer[self._filled:end] = audio
        self._filled = end

    def feed(self, frame: np.ndarray) -> list[BarCut]:
        """Adds one int16 frame [1920, 2]; returns the bars it completed (usually none),
        for `finish` in the order they came."""
        if self._to_skip:
            frame, self._to_skip = frame[self._to_skip:], 0
        audio = to_float(frame)
        if self._resampler is not None:
            audio = self._resampler.resample_chunk(audio)
        self._append(audio)
        cuts = []
        while self._filled >= (length := self._chunk_edges[-1] - self._chunk_edges[0]):
            buffer, edges = self._buffer, self._chunk_edges
            cuts.append(BarCut(buffer[:length], [e - edges[0] for e in edges[:-1]],
                               self.chunks * self.bars_per_chunk, self.bars_per_chunk))
            self.chunks += 1
            self._open_chunk(carried=buffer[length:self._filled])
        return cuts

    def finish(self, cut: BarCut) -> BarChunk:
        """Loudness-matched int16 bars. Call in the order `feed` cut them: each chunk's
        gain ramps from the one before it ended with."""
        audio, report = cut.audio, None
        if self.loudness is not None:
            audio, report = self.loudness.apply(audio, cut.bar_starts,
                                                start_gain_db=self._last_gain_db)
            self._last_gain_db = (report.get("bar_gains_db") or [None])[-1]
        return BarChunk(to_int16(audio), cut.first_bar, cut.bars, self.rate, report)

    def chunk_of_sample(self, sample_48k: int) -> int:
        """The chunk a 48 kHz sample position falls in."""
        bar_samples = self.clock.seconds_per_bar * SAMPLE_RATE * self.bars_per_chunk
        return int((sample_48k - self.skip_samples) // bar_samples)
