"""What a WebSocket jam needs to play on when its generator replica stops.

A replica stops on scale-down (Serve, not us, picks which one) or when it crashes, and
the state of its sessions goes with it. The ingress holds each stream's client side,
so it remembers what a session on another replica needs to continue where the
listener is:
- the spec the session would start with now: the start's, with each update merged in;
- the codes of the frames the listener heard last: the model's own context, forced
  into the new session's state (no re-encoding of audio, so nothing is lost to the
  codec), so that it plays on from there rather than from nothing;
- where the listener's count of chunks, frames and bars stands, so that indices,
  `first_frame` and bar numbers run on across the move, and bar mode stays on its grid.

What does not carry over: the sampler's random stream (the continuation is a new draw
from the same context), a style ramp in progress (the new session starts at its
target), and a reseed still waiting for its chunk boundary (one that has applied is in
the codes heard).
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

from ..engine.session import CODE_LEVELS
from ..frames import FRAME_SAMPLES, SAMPLE_RATE
from ..generator import JamSpec, JamUpdate
from ..jam import Chunk

# Codes kept per stream: more than any variant's context (mrt2_base: 500 frames), about
# 24 KB a stream. The generator keeps the last `context_frames` of what it is given.
MAX_HEARD_FRAMES = 1024


@dataclasses.dataclass(frozen=True)
class Continuation:
    """A session to start on another replica, and where its chunk 0, frame 0 and bar 0
    fall in the listener's count."""

    spec: JamSpec
    index: int
    frame: int
    bar: int


class StreamMemory:
    def __init__(self, spec: JamSpec) -> None:
        self.spec = spec
        self._heard: collections.deque[np.ndarray] = collections.deque(maxlen=MAX_HEARD_FRAMES)
        self._heard_end = 0  # the listener's frame after the last code kept
        # the current session's chunk 0, frame 0 and bar 0 in the listener's count
        self.index_offset = self.frame_offset = self.bar_offset = 0
        self.next_index = 0  # the listener's next chunk
        self.next_bar = 0  # bar mode: the bar the next chunk starts with
        self.moves = 0

    def update(self, update: JamUpdate) -> None:
        self.spec = self.spec.updated(update)

    def played(self, chunk: Chunk) -> Chunk:
        """The session's chunk as the listener counts it; its codes are remembered."""
        extra = dict(chunk.extra)
        if "first_bar" in extra:
            extra["first_bar"] += self.bar_offset
            first_frame = self.spec.bar.clock.first_frame(extra["first_bar"])
            self.next_bar = extra["first_bar"] + extra["bars"]
        else:
            first_frame = chunk.first_frame + self.frame_offset
        if chunk.codes is not None and len(chunk.codes):
            start = chunk.codes_from + self.frame_offset
            if start != self._heard_end:
                self._heard.clear()  # not contiguous with what is kept: keep the newest
            self._heard.extend(chunk.codes)
            self._heard_end = start + len(chunk.codes)
        index = chunk.index + self.index_offset
        self.next_index = index + 1
        return dataclasses.replace(chunk, index=index, first_frame=first_frame, extra=extra,
                                   codes=None)

    def session_index(self, index: int) -> int:
        """The current session's number for the listener's chunk `index` (negative: a
        chunk of a session before the move)."""
        return index - self.index_offset

    def client_index(self, index: int) -> int:
        return index + self.index_offset

    def continuation(self) -> Continuation:
        """The session that plays on from here. A realtime stream continues right after
        its last chunk's last frame. A bar-mode stream continues from the bar line its
        last chunk ended on: frames line up with bars only by chance, so the new session
        is forced up to the frame line before it, and its chunker drops the samples
        from there to the bar line, which the listener has heard."""
        spec, frame = self.spec, self._heard_end
        if spec.bar is not None:
            line = spec.bar.clock.boundary(self.next_bar, SAMPLE_RATE)
            frame, skip = divmod(line, FRAME_SAMPLES)
            spec = dataclasses.replace(spec, bar=dataclasses.replace(spec.bar,
                                                                     skip_samples=skip))
        heard = list(self._heard)
        if frame > self._heard_end:  # the codes before the line are not all here
            heard = []
        elif frame < self._heard_end:
            heard = heard[:len(heard) - (self._heard_end - frame)]
        codes = np.asarray(heard, np.int32).reshape(-1, CODE_LEVELS)
        if codes.shape[0]:
            spec = dataclasses.replace(spec, heard=codes)
        return Continuation(spec, self.next_index, frame, self.next_bar)

    def moved(self, continuation: Continuation) -> None:
        """The continuation's session has started: its chunks count on from here."""
        self.index_offset = continuation.index
        self.frame_offset = continuation.frame
        self.bar_offset = continuation.bar
        # what was forced is the new session's context: kept for a move after this one
        self._heard.clear()
        if continuation.spec.heard is not None:
            self._heard.extend(continuation.spec.heard)
        self._heard_end = continuation.frame
        self.moves += 1
