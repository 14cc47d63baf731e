"""What a WebSocket jam needs to play on when its generator replica stops.

A replica stops on scale-down (Serve, not us, picks which one) or when it crashes, and
the state of its sessions goes with it. The ingress holds each stream's client side,
so it remembers what a session on another replica needs to continue where the
listener is:
- the spec the session would start with now: the start's, with each update merged in;
- the context the listener heard last: the codes of the frames heard, with the loop
  codes forced in between them (a loop jam's loop, an applied reseed). This is the
  model's own context, forced into the new session's state (no re-encoding of audio,
  so nothing is lost to the codec), so that it plays on from there rather than from
  nothing;
- a reseed not applied yet: its codes and the chunk it opens, so that it still opens
  that chunk after a move;
- where the listener's count of chunks, frames and bars stands, so that indices,
  `first_frame` and bar numbers run on across the move, and bar mode stays on its grid;
- a style glide in progress (the last chunk's `style_ramp`), so that the new session
  glides on towards the same style instead of jumping to it.

What does not carry over: the sampler's random stream (the continuation is a new draw
from the same context), and a glide whose update came after the last chunk (the new
session starts at the update's style).
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

from ..engine.session import CODE_LEVELS
from ..frames import FRAME_SAMPLES, SAMPLE_RATE
from ..jam import Chunk
from ..jam_spec import JamSpec, JamUpdate
from ..styles import RampState

# Context rows kept per stream: more than any variant's context (mrt2_base: 500
# frames), about 24 KB a stream. The generator keeps the last `context_frames` of them.
MAX_CONTEXT_ROWS = 1024
FORCED = -1  # a context row's frame number when it was forced, not heard


@dataclasses.dataclass(frozen=True)
class Continuation:
    """A session to start on another replica, and where its chunk 0, frame 0 and bar 0
    fall in the listener's count."""

    spec: JamSpec
    index: int
    frame: int
    bar: int
    # the context rows the spec forces (frame numbers and codes), reseed excluded: what
    # the stream remembers until the new session's first chunk brings them back
    context: tuple[tuple[int, np.ndarray], ...] = ()


class StreamMemory:
    def __init__(self, spec: JamSpec) -> None:
        self.spec = spec
        # (frame number as the listener counts it, or FORCED; codes [12])
        self._context: collections.deque[tuple[int, np.ndarray]] = collections.deque(
            maxlen=MAX_CONTEXT_ROWS)
        self._heard_end = 0  # the listener's frame after the last frame heard
        self._forced_again = False  # a moved session's first codes repeat what it forced
        self._reseed: tuple[np.ndarray, int] | None = None  # codes, the listener's chunk
        self._ramp: RampState | None = None  # the style glide the last chunk was in
        # the current session's chunk 0, frame 0 and bar 0 in the listener's count
        self.index_offset = self.frame_offset = self.bar_offset = 0
        self.next_index = 0  # the listener's next chunk
        self.next_bar = 0  # bar mode: the bar the next chunk starts with
        self.moves = 0

    def update(self, update: JamUpdate) -> None:
        self.spec = self.spec.updated(update)
        if update.style is not None and not update.style.empty:
            self._ramp = None  # a glide towards another style: the next chunk says where

    def reseeded(self, codes: np.ndarray, applies_from_chunk: int) -> None:
        """A reseed answered: `codes` replace the context where the listener's chunk
        `applies_from_chunk` starts (a later reseed replaces a waiting one). One whose
        chunk has been played already (the answer raced the stream) is in the codes."""
        if applies_from_chunk >= self.next_index:
            self._reseed = (codes, applies_from_chunk)

    @property
    def reseed_waiting(self) -> int | None:
        """The listener's chunk that a reseed not applied yet opens."""
        return self._reseed[1] if self._reseed is not None else None

    def played(self, chunk: Chunk) -> Chunk:
        """The session's chunk as the listener counts it; its codes are remembered."""
        extra = dict(chunk.extra)
        if "first_bar" in extra:
            extra["first_bar"] += self.bar_offset
            first_frame = self.spec.bar.clock.first_frame(extra["first_bar"])
            self.next_bar = extra["first_bar"] + extra["bars"]
        else:
            first_frame = chunk.first_frame + self.frame_offset
        index = chunk.index + self.index_offset
        if self._reseed is not None and index >= self._reseed[1]:
            self._reseed = None  # applied: its codes come with this chunk's
        if chunk.codes is not None and len(chunk.codes):
            self._remember(chunk)
        self._ramp = chunk.style_ramp
        self.next_index = index + 1
        return dataclasses.replace(chunk, index=index, first_frame=first_frame, extra=extra,
                                   codes=None, codes_forced=(), style_ramp=None)

    def _remember(self, chunk: Chunk) -> None:
        frame = chunk.codes_from + self.frame_offset
        if self._forced_again or frame != self._heard_end:
            self._context.clear()  # not contiguous with what is kept: keep the newest
            self._forced_again = False
        forced = set(chunk.codes_forced)
        for row, codes in enumerate(chunk.codes):
            if row in forced:
                self._context.append((FORCED, codes))
            else:
                self._context.append((frame, codes))
                frame += 1
        self._heard_end = frame

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
        from there to the bar line, which the listener has heard. A reseed still
        waiting opens the same chunk of the listener's as it would have."""
        spec, frame = self.spec, self._heard_end
        if spec.bar is not None:
            line = spec.bar.clock.boundary(self.next_bar, SAMPLE_RATE)
            frame, skip = divmod(line, FRAME_SAMPLES)
            spec = dataclasses.replace(spec, bar=dataclasses.replace(spec.bar,
                                                                     skip_samples=skip))
        context = self._context_before(frame)
        codes = [c for _, c in context]
        if self._reseed is not None:
            reseed, applies = self._reseed
            if applies <= self.next_index:  # it opens the new session's first chunk
                codes.extend(reseed)
            else:
                spec = dataclasses.replace(spec, reseed=reseed,
                                           reseed_chunk=applies - self.next_index)
        if codes:
            spec = dataclasses.replace(
                spec, heard=np.asarray(codes, np.int32).reshape(-1, CODE_LEVELS))
        if self._ramp is not None:
            spec = dataclasses.replace(spec, style_ramp=self._ramp)
        return Continuation(spec, self.next_index, frame, self.next_bar, tuple(context))

    def _context_before(self, frame: int) -> list[tuple[int, np.ndarray]]:
        """The rows kept before frame `frame`: the frames heard before it, each with the
        rows forced just before it."""
        if frame > self._heard_end:  # the frames before it are not all here
            return []
        rows = list(self._context)
        while rows and rows[-1][0] >= frame:  # a frame heard from `frame` on
            rows.pop()
            while rows and rows[-1][0] == FORCED:  # forced just before it
                rows.pop()
        return rows

    def moved(self, continuation: Continuation) -> None:
        """The continuation's session has started: its chunks count on from here."""
        self.index_offset = continuation.index
        self.frame_offset = continuation.frame
        self.bar_offset = continuation.bar
        # What was forced is the new session's context: kept for a move before its first
        # chunk, which brings the same codes back (as forced rows) and replaces them.
        self._context.clear()
        self._context.extend(continuation.context)
        self._forced_again = True
        self._heard_end = continuation.frame
        self.moves += 1
