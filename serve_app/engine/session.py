"""A streaming session: one listener's controls, turned into conditioning frame by frame.

The session owns everything that is per-listener and host-side (style ramp, held
notes, sampling settings, seed, frame counter). Its model state lives in the
engine's batch; `BatchedEngine.snapshot`/`restore` move both together.
"""

from __future__ import annotations

import dataclasses
import uuid

import numpy as np

from ..styles import StyleModel, StyleRamp
from .conditioning import DEFAULT_CFG, DRUMS, NoteTracker, build_block

MAX_TOP_K = 1024  # one RVQ level's codebook


@dataclasses.dataclass
class Controls:
    """Sampling controls that an update may change between any two frames."""

    temperature: float = 1.3
    top_k: int = 40
    cfg: dict[str, float] = dataclasses.field(default_factory=lambda: dict(DEFAULT_CFG))
    drums: str = "free"

    def __post_init__(self) -> None:
        self.cfg = {**DEFAULT_CFG, **self.cfg}  # a partial dict overrides single scales

    def validate(self) -> None:
        if not 0.0 <= self.temperature <= 10.0:
            raise ValueError(f"temperature: must be within 0..10, got {self.temperature}")
        if not 1 <= self.top_k <= MAX_TOP_K:
            raise ValueError(f"topk: must be within 1..{MAX_TOP_K}, got {self.top_k}")
        if self.drums not in DRUMS:
            raise ValueError(f"drums: must be one of {sorted(DRUMS)}, got {self.drums!r}")
        unknown = set(self.cfg) - set(DEFAULT_CFG)
        if unknown:
            raise ValueError(f"cfg: unknown guidance keys {sorted(unknown)}")
        for key, value in self.cfg.items():
            if not -1.0 <= value <= 7.0:
                raise ValueError(f"cfg_{key}: guidance must be within -1..7, got {value}")


class Session:
    """Per-listener host state; `next_frame_inputs` is called once per generated frame."""

    def __init__(
        self,
        style: np.ndarray | None,
        *,
        seed: int = 0,
        controls: Controls | None = None,
        notes=None,
        session_id: str | None = None,
    ) -> None:
        self.id = session_id or uuid.uuid4().hex
        if not 0 <= seed < 2**32:
            raise ValueError(f"seed: must be within 0..2**32-1, got {seed}")
        self.seed = seed
        self.controls = controls or Controls()
        self.controls.validate()
        self.notes = NoteTracker()
        self.notes.set(notes)
        self._ramp = None if style is None else StyleRamp(style)
        self._tokens_for: np.ndarray | None = None
        self._tokens: np.ndarray | None = None
        self.frames_generated = 0

    def set_style(self, embedding: np.ndarray, ramp_seconds: float = 0.0) -> None:
        if ramp_seconds < 0:
            raise ValueError(f"style_ramp_seconds: must be >= 0, got {ramp_seconds}")
        if self._ramp is None:
            self._ramp = StyleRamp(embedding)
        else:
            self._ramp.set_target(embedding, ramp_seconds)

    def update_controls(self, **changes) -> None:
        """Applies changes atomically: all valid, or none applied."""
        cfg = {**self.controls.cfg, **changes.pop("cfg", {})}
        candidate = dataclasses.replace(self.controls, cfg=cfg, **changes)
        candidate.validate()
        self.controls = candidate

    def _style_tokens(self, style_model: StyleModel) -> np.ndarray | None:
        if self._ramp is None:
            return None
        embedding = self._ramp.next_frame()
        if embedding is not self._tokens_for:  # tokenize only when the style moved
            self._tokens = style_model.tokenize(embedding)
            self._tokens_for = embedding
        return self._tokens

    def next_frame_inputs(self, style_model: StyleModel) -> tuple[np.ndarray, float, int]:
        """(conditioning block [144], temperature, top_k) for the next frame."""
        c = self.controls
        block = build_block(
            self._style_tokens(style_model), self.notes.next_frame(), DRUMS[c.drums], c.cfg
        )
        self.frames_generated += 1
        return block, c.temperature, c.top_k
