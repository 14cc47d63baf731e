"""What a client asks of a generator, as the ingress hands it over: a jam's spec, an update
to it, and the session id that says which variant and replica hold the jam.

Plain data over the light modules (audio, styles' ramps, the engine's controls): the
ingress builds these and never imports the generator, which brings the model and JAX.
"""

from __future__ import annotations

import dataclasses
import uuid

import numpy as np

from .audio.barclock import BarClock
from .audio.bars import BarChunker
from .audio.loudness import LoudnessMatcher
from .engine.session import Controls
from .frames import SAMPLE_RATE
from .jam import StreamConfig
from .styles import RampState

SESSION_SEPARATOR = "@"


@dataclasses.dataclass
class StyleSpec:
    """Embedded prompts with weights plus finetune steering weights."""

    names: list[str] = dataclasses.field(default_factory=list)  # the prompts, for metadata
    embeddings: list[np.ndarray] = dataclasses.field(default_factory=list)
    weights: list[float] = dataclasses.field(default_factory=list)
    mean: float = 0.0
    centroid_weights: list[float] = dataclasses.field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.embeddings and not self.mean and not any(self.centroid_weights)


@dataclasses.dataclass
class BarSpec:
    """Bar mode: chunks of whole bars on an exact grid, at a target rate, loudness
    matched to the loop (when there is one)."""

    clock: BarClock
    bars_per_chunk: int = 1
    rate: int = SAMPLE_RATE
    loudness_mode: str = "auto"
    headroom_db: float = 1.0
    skip_samples: int = 0  # a moved stream's first samples, heard already (BarChunker)

    def chunker(self, loop: np.ndarray | None) -> BarChunker:
        matcher = None
        if loop is not None and self.loudness_mode != "none":
            matcher = LoudnessMatcher(loop, self.loudness_mode, self.headroom_db, self.rate)
        return BarChunker(self.clock, self.bars_per_chunk, self.rate, matcher,
                          self.skip_samples)


@dataclasses.dataclass
class JamSpec:
    style: StyleSpec
    controls: Controls = dataclasses.field(default_factory=Controls)
    stream: StreamConfig = dataclasses.field(default_factory=StreamConfig)
    notes: list[int] | None = None
    seed: int | None = None
    loop: np.ndarray | None = None  # float32 [n, 2] at 48 kHz: context to continue
    bar: BarSpec | None = None
    tempo_guidance_bpm: float | None = None  # experimental drum pulses on the beat
    polled: bool = False  # a /jam/start jam, which no connection holds: /jam/stop_all ends it
    # int32 [n, 12]: the context a moved stream's listener heard last (loop codes
    # included), forced into the new session's state in place of the loop's, so that it
    # plays on from there
    heard: np.ndarray | None = None
    # A moved stream's reseed that had not applied yet: its codes, and the chunk of the
    # new session it opens (1 or later; one due at chunk 0 ends `heard` instead)
    reseed: np.ndarray | None = None
    reseed_chunk: int = 0
    # A moved stream's style glide in progress: the new session glides on towards its
    # style from there
    style_ramp: RampState | None = None

    def updated(self, update: JamUpdate) -> JamSpec:
        """The spec that starts a session sounding as one started with this spec does
        after `update` (the end of any style ramp): what a moved stream restarts with."""
        style = update.style if update.style is not None and not update.style.empty \
            else self.style
        notes = update.notes if update.notes is not None else self.notes
        return dataclasses.replace(self, style=style, notes=notes,
                                   controls=self.controls.with_changes(**(update.controls or {})))


@dataclasses.dataclass
class JamUpdate:
    """Fields left as None keep their values."""

    style: StyleSpec | None = None
    style_ramp_seconds: float = 0.0
    controls: dict | None = None
    notes: list[int] | None = None


def make_session_id(variant: str, replica: str) -> str:
    """`<random>.<variant>@<replica>`: any ingress can tell where a session lives."""
    return f"{uuid.uuid4().hex[:16]}.{variant}{SESSION_SEPARATOR}{replica}"


def replica_of(session_id: str) -> str:
    return session_id.rpartition(SESSION_SEPARATOR)[2]


def variant_of(session_id: str) -> str:
    return session_id.partition(SESSION_SEPARATOR)[0].rpartition(".")[2]
