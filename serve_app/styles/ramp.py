"""A glide from the current style embedding to a new one, one step per frame."""

from __future__ import annotations

import numpy as np

from ..frames import FRAMES_PER_SECOND


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
        self._start = self.current
        self._target = np.asarray(embedding, np.float32)
        self._frames = max(0, round(seconds * FRAMES_PER_SECOND))
        self._done = 0
        if self._frames == 0:
            self.current = self._target

    def next_frame(self) -> np.ndarray:
        """The embedding for the frame about to be generated."""
        if self.ramping:
            self._done += 1
            t = self._done / self._frames
            self.current = ((1.0 - t) * self._start + t * self._target).astype(np.float32)
        return self.current
