"""A loaded model's loop encoder: audio in, the context codes a session is prefilled with.

Built (and compiled, on a fixed input length: one compile) when a model loads, so
the first loop request does not wait on XLA. A repo without the encoder still
serves style jams; loop requests then get a 503 that says why.
"""

from __future__ import annotations

import logging

import numpy as np

from .audio.barclock import BarClock
from .audio.context import tiled_context
from .engine import LoadedModel
from .engine.variants import CHANNELS
from .errors import Unavailable

log = logging.getLogger(__name__)

WARM_SECONDS_OF_SILENCE = 2.0


class LoopEncoder:
    def __init__(self, loaded: LoadedModel) -> None:
        self._encoder = loaded.audio_encoder()
        self.frames = loaded.variant.context_frames
        silence = np.zeros((int(WARM_SECONDS_OF_SILENCE * 48000), CHANNELS), np.float32)
        self.codes(silence, BarClock(120.0))  # compiles it

    def codes(self, loop: np.ndarray, clock: BarClock) -> np.ndarray:
        """A loop's context codes [context_frames, 12], ending on a bar line."""
        return self._encoder.encode(tiled_context(loop, clock, self.frames))[-self.frames:]


class NoLoopEncoder:
    """Stands in when the encoder could not be built; says why on use."""

    def __init__(self, name: str, reason: str) -> None:
        self.name, self.reason = name, reason

    def codes(self, loop: np.ndarray, clock: BarClock) -> np.ndarray:
        raise Unavailable(f"loop_audio: generator {self.name} cannot encode audio "
                          f"({self.reason})")


def build_loop_encoder(loaded: LoadedModel, name: str) -> LoopEncoder | NoLoopEncoder:
    try:
        encoder = LoopEncoder(loaded)
    except Exception as e:
        log.warning("generator %s: no loop encoder (%s)", name, e)
        return NoLoopEncoder(name, f"{type(e).__name__}: {e}")
    log.info("generator %s: loop encoder ready", name)
    return encoder
