"""Per-frame conditioning: what a session asks of the model, as the 144-token block.

Layout follows `MagentaRT2ModelBase.input_configs` and upstream's
`_build_conditioning`: 12 MusicCoCa style tokens, a 128-pitch pianoroll, one drums
token, two CFG tokens (musiccoca, notes) and one CFG token (drums); every value is
shifted by NUM_RESERVED_TOKENS + 1 and -1 means "masked / model's choice".
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable

import numpy as np
from magenta_rt.config import (
    CFG_CONDITIONING_DRUMS,
    CFG_CONDITIONING_MUSICCOCA_NOTES,
    DRUM_PIANOROLL,
    MUSICCOCA,
    NUM_RESERVED_TOKENS,
    PIANOROLL_WITH_ONSETS,
)

TOKEN_OFFSET = NUM_RESERVED_TOKENS + 1
MASKED = -1

STYLE_SLICE = slice(0, MUSICCOCA.rvq_truncation_level)  # 0:12
NOTES_SLICE = slice(STYLE_SLICE.stop, STYLE_SLICE.stop + PIANOROLL_WITH_ONSETS.rvq_truncation_level)
DRUMS_INDEX = NOTES_SLICE.stop  # 140
CFG_STYLE_INDEX = DRUMS_INDEX + DRUM_PIANOROLL.rvq_truncation_level  # 141
CFG_NOTES_INDEX = CFG_STYLE_INDEX + 1  # 142
CFG_DRUMS_INDEX = CFG_STYLE_INDEX + CFG_CONDITIONING_MUSICCOCA_NOTES.rvq_truncation_level  # 143
BLOCK_SIZE = CFG_DRUMS_INDEX + CFG_CONDITIONING_DRUMS.rvq_truncation_level  # 144

# Pianoroll states (magenta_rt.config.PIANOROLL_WITH_ONSETS).
NOTE_OFF, NOTE_HELD, NOTE_ONSET = 0, 1, 2
DRUMS = {"free": MASKED, "off": 0, "on": 1}

DEFAULT_CFG = {"musiccoca": 3.0, "notes": 1.0, "drums": 1.0}


@functools.cache
def _upstream_binning() -> Callable[[float, float, int], int]:
    """Upstream's `discretize_cfg`. It lives in its JAX system module: imported the first
    time a frame is built (in the generator, which has JAX), not where the ingress imports
    these constants, and not again for every frame of every session."""
    from magenta_rt.jax.system import discretize_cfg

    return discretize_cfg


def cfg_tokens(cfg: dict[str, float]) -> tuple[int, int, int]:
    """CFG scales -> (musiccoca, notes, drums) token indices, binned like upstream."""
    discretize_cfg = _upstream_binning()
    style_max = CFG_CONDITIONING_MUSICCOCA_NOTES.codebook_size - 1
    return (
        discretize_cfg(cfg["musiccoca"], CFG_CONDITIONING_MUSICCOCA_NOTES.step, style_max),
        discretize_cfg(cfg["notes"], CFG_CONDITIONING_MUSICCOCA_NOTES.step, style_max),
        discretize_cfg(
            cfg["drums"], CFG_CONDITIONING_DRUMS.step, CFG_CONDITIONING_DRUMS.codebook_size - 1
        ),
    )


@dataclasses.dataclass
class NoteTracker:
    """Turns 'these pitches are held now' into pianoroll tokens with onsets.

    `None` means notes are not conditioned (all masked). A pitch that was not held
    on the previous frame gets an onset token on its first frame, then 'held'.
    """

    held: frozenset[int] | None = None
    _sounding: frozenset[int] = frozenset()

    def set(self, pitches: Iterable[int] | None) -> None:
        if pitches is None:
            self.held = None
            return
        held = frozenset(int(p) for p in pitches)
        bad = sorted(p for p in held if not 0 <= p < PIANOROLL_WITH_ONSETS.rvq_truncation_level)
        if bad:
            raise ValueError(f"notes: MIDI pitches must be 0..127, got {bad}")
        self.held = held

    def next_frame(self) -> np.ndarray:
        roll = np.full(PIANOROLL_WITH_ONSETS.rvq_truncation_level, MASKED, np.int32)
        if self.held is None:
            self._sounding = frozenset()
            return roll
        roll[:] = NOTE_OFF
        for pitch in self.held:
            roll[pitch] = NOTE_HELD if pitch in self._sounding else NOTE_ONSET
        self._sounding = self.held
        return roll


def build_block(
    style_tokens: np.ndarray | None,
    notes: np.ndarray,
    drums: int,
    cfg: dict[str, float],
) -> np.ndarray:
    """One frame's conditioning block: [144] int32, already offset for the model."""
    block = np.full(BLOCK_SIZE, MASKED, np.int32)
    if style_tokens is not None:
        block[STYLE_SLICE] = style_tokens
    block[NOTES_SLICE] = notes
    block[DRUMS_INDEX] = drums
    block[CFG_STYLE_INDEX], block[CFG_NOTES_INDEX], block[CFG_DRUMS_INDEX] = cfg_tokens(cfg)
    return block + TOKEN_OFFSET
