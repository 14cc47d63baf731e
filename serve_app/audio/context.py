"""A loop laid out as model context: whole bars, tiled, ending on a bar line.

The model can only see `context_frames` of the past (about 20 s; see
`Variant.context_frames`), so that is how much loop it gets: more only costs prefill
time. The loop is first fitted to the whole number of bars closest to its length at
the session's BPM (trimmed, or extended by repeating itself), then repeated back from
the end so the context's last sample is a bar line: generation starts on a downbeat.
A few extra frames in front warm the SpectroStream encoder's own causal convolutions;
their codes are encoded and dropped.
"""

from __future__ import annotations

import numpy as np

from ..frames import FRAME_SAMPLES
from .barclock import BarClock

ENCODER_WARM_FRAMES = 10


def fit_to_bars(loop: np.ndarray, clock: BarClock) -> np.ndarray:
    """The loop cut or extended (by repetition) to its nearest whole number of bars."""
    length = clock.samples(clock.bars_in(loop.shape[0]))
    reps = -(-length // loop.shape[0])
    return np.tile(loop, (reps, 1))[:length]


def tiled_context(loop: np.ndarray, clock: BarClock, frames: int) -> np.ndarray:
    """float [(frames + warm) * 1920, 2]: the bar-fitted loop repeated, ending on its end."""
    bars = fit_to_bars(loop, clock)
    needed = (frames + ENCODER_WARM_FRAMES) * FRAME_SAMPLES
    reps = -(-needed // bars.shape[0])
    return np.tile(bars, (reps, 1))[-needed:]
