"""A glide from the current style embedding to a new one, one step per frame."""

from __future__ import annotations

import dataclasses

import numpy as np

from ..frames import FRAMES_PER_SECOND

# The longest glide: an hour, longer than any jam. Bounded so that its frame count is a
# number (a glide of 1e308 s overflowed to infinity and closed the client's socket).
MAX_RAMP_SECONDS = 3600.0


def check_ramp_seconds(seconds: float) -> float:
    """`seconds` if it is a glide's length, else a ValueError naming the field."""
    if not 0 <= seconds <= MAX_RAMP_SECONDS:  # NaN fails this too
        raise ValueError(f"style_ramp_seconds: must be from 0 to {MAX_RAMP_SECONDS:g}, "
                         f"got {seconds}")
    return seconds


@dataclasses.dataclass(frozen=True)
class RampState:
    """A glide in progress, without its target: where it started (float32 embedding),
    its length and the frames done. A stream that moves to another replica carries it,
    so the new session glides on towards the same target instead of jumping to it."""

    start: np.ndarray
    frames: int
    done: int


class StyleRamp:
    """Linear interpolation in embedding space over `seconds`, advanced per frame.

    A new target mid-ramp starts from wherever the glide is, so the style never jumps.
    """

    def __init__(self, embedding: np.ndarray) -> None:
        self._start = self._target = self.current = np.asarray(embedding, np.float32)
        self._frames = 0
        self._done = 0

    @property
    def ramping(self) -> bool:
        return self._done < self._frames

    def set_target(self, embedding: np.ndarray, seconds: float) -> None:
        frames = round(check_ramp_seconds(seconds) * FRAMES_PER_SECOND)
        self._start = self.current
        self._target = np.asarray(embedding, np.float32)
        self._frames = frames
        self._done = 0
        if self._frames == 0:
            self.current = self._target

    def state(self) -> RampState | None:
        """The glide in progress (None when there is none)."""
        return RampState(self._start, self._frames, self._done) if self.ramping else None

    def resume(self, state: RampState) -> None:
        """Goes on with a glide `state` says is in progress, towards this ramp's target;
        one from an embedding of another shape (another style model) is ignored."""
        start = np.asarray(state.start, np.float32)
        if start.shape != self._target.shape or not 0 <= state.done < state.frames:
            return
        self._start, self._frames, self._done = start, state.frames, state.done
        t = self._done / self._frames
        self.current = ((1.0 - t) * self._start + t * self._target).astype(np.float32)

    def next_frame(self) -> np.ndarray:
        """The embedding for the frame about to be generated."""
        if self.ramping:
            self._done += 1
            t = self._done / self._frames
            self.current = ((1.0 - t) * self._start + t * self._target).astype(np.float32)
        return self.current
