"""Offline rendering: one session through the same batched engine the server uses."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from .engine import BatchedEngine, Controls, LoadedModel, Session
from .engine.variants import FRAMES_PER_SECOND
from .styles import blend


@dataclasses.dataclass
class RenderRequest:
    styles: list[tuple[str, float]]
    seconds: float
    seed: int = 0
    controls: Controls = dataclasses.field(default_factory=Controls)
    notes: list[int] | None = None
    mean: float = 0.0
    centroid_weights: list[float] = dataclasses.field(default_factory=list)

    @property
    def frames(self) -> int:
        frames = round(self.seconds * FRAMES_PER_SECOND)
        if frames < 1:
            raise ValueError(f"seconds: must be at least one frame (0.04 s), got {self.seconds}")
        return frames


def style_embedding(loaded: LoadedModel, request: RenderRequest) -> np.ndarray | None:
    """The request's blended style, or None for an unconditioned (masked) style."""
    if not request.styles and not request.mean and not any(request.centroid_weights):
        return None
    return blend(
        [loaded.style.embed_text(text) for text, _ in request.styles],
        [w for _, w in request.styles],
        steering=loaded.steering,
        mean=request.mean,
        centroid_weights=request.centroid_weights,
    )


def render(
    loaded: LoadedModel,
    request: RenderRequest,
    *,
    on_frame: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Generates `request.seconds` of audio: int16 [frames * 1920, 2] at 48 kHz."""
    frames = request.frames
    engine = BatchedEngine(loaded.model, loaded.style, buckets=(1,))
    session = Session(
        style_embedding(loaded, request),
        seed=request.seed,
        controls=request.controls,
        notes=request.notes,
    )
    engine.add(session)
    chunks = []
    while len(chunks) < frames:  # plus the decoder's delay: `decoder_delay` steps more
        frame = engine.step()[session.id]
        if frame.audible:
            chunks.append(frame.audio)
            if on_frame:
                on_frame(len(chunks))
    return np.concatenate(chunks, axis=0)
