"""A streaming session: one listener's controls, turned into conditioning frame by frame.

The session owns everything that is per-listener and host-side (style ramp, held
notes, sampling settings, seed, frame counter, loop codes waiting to be forced into
its state, the codes of its recent context). Its model state lives in the engine's
batch; `BatchedEngine.snapshot`/`restore` move both together.
"""

from __future__ import annotations

import collections
import dataclasses
import uuid
from fractions import Fraction
from typing import TYPE_CHECKING

import numpy as np

from ..frames import FRAME_SAMPLES, SAMPLE_RATE
from ..styles import RampState, StyleRamp, check_ramp_seconds
from .conditioning import DEFAULT_CFG, DRUMS, NoteTracker, build_block

if TYPE_CHECKING:  # MusicCoCa: the generator has it; the ingress, importing Controls, not
    from ..styles import StyleModel

MAX_TOP_K = 1024  # one RVQ level's codebook
CODE_LEVELS = 12  # RVQ levels per frame
DEFAULT_CONTEXT_FRAMES = 500  # the models' design receptive field, 20 s


@dataclasses.dataclass
class FrameInputs:
    block: np.ndarray  # int32 [144] conditioning
    sampling: tuple[float, int]  # temperature, top_k
    forced: np.ndarray | None = None  # int32 [12] codes to take instead of sampling


class BeatPulse:
    """Experimental tempo guidance: the drums token says "drums" on frames where a beat
    starts and is left free between, nudging the model towards the requested tempo.
    Beat onsets are exact (rational samples), so the grid never drifts."""

    def __init__(self, bpm: float) -> None:
        if not 20 <= bpm <= 400:
            raise ValueError(f"tempo_guidance_bpm: must be within 20..400, got {bpm}")
        self.bpm = bpm
        self._beat_samples = Fraction(60 * SAMPLE_RATE) / Fraction(str(bpm))
        self.frame = 0

    def next_frame(self) -> bool:
        start, end = self.frame * FRAME_SAMPLES, (self.frame + 1) * FRAME_SAMPLES
        self.frame += 1
        # a beat at k * beat_samples lies in [start, end)
        first_beat = -(-start // self._beat_samples)  # ceil
        return first_beat * self._beat_samples < end


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

    def with_changes(self, **changes) -> Controls:
        """These controls with an update's changes (`cfg` merged key by key), validated:
        what a session applies, and what the ingress remembers for a moved stream."""
        cfg = {**self.cfg, **changes.pop("cfg", {})}
        candidate = dataclasses.replace(self, cfg=cfg, **changes)
        candidate.validate()
        return candidate


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
        context_frames: int = DEFAULT_CONTEXT_FRAMES,
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
        self.frames_generated = 0  # sampled frames (the audio a listener hears)
        self.frames_forced = 0
        self._prefill: collections.deque[np.ndarray] = collections.deque()
        self.context = collections.deque(maxlen=context_frames)  # codes, forced or sampled
        # How many of the context's newest codes came since the last frame the listener
        # heard (forced ones included): handed out with the next frame heard (`record`).
        self._since_heard = 0
        # Per step still inside the decoder's delay: that step's codes if they were
        # sampled, None if forced. Set when the session first joins an engine
        # (`attach_decoder`).
        self._decoding: collections.deque[np.ndarray | None] | None = None
        self.pulse: BeatPulse | None = None

    # -- loop context ---------------------------------------------------------
    def prefill(self, codes: np.ndarray) -> None:
        """Queues loop codes [k, 12] to force into the state, replacing any still queued."""
        codes = np.asarray(codes, np.int32)
        if codes.ndim != 2 or codes.shape[1] != CODE_LEVELS:
            raise ValueError(f"codes: expected [frames, {CODE_LEVELS}], got {codes.shape}")
        if codes.min(initial=0) < 0 or codes.max(initial=0) >= MAX_TOP_K:
            raise ValueError(f"codes: must be within 0..{MAX_TOP_K - 1}")
        self._prefill = collections.deque(codes)

    @property
    def prefill_pending(self) -> int:
        return len(self._prefill)

    def next_forced_run(
        self, style_model: StyleModel, frames: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Conditioning [frames, 144] and loop codes [frames, 12] for that many queued
        frames forced at once (`BatchedEngine`'s prefill runs). The style ramp and held
        notes move on exactly as they would frame by frame."""
        if not 0 < frames <= len(self._prefill):
            raise ValueError(f"frames: {frames} forced at once, {len(self._prefill)} queued")
        inputs = [self.next_frame_inputs(style_model) for _ in range(frames)]
        return np.stack([i.block for i in inputs]), np.stack([i.forced for i in inputs])

    def recent_context(self, frames: int) -> np.ndarray:
        """The last `frames` codes of this session's context (forced and sampled)."""
        recent = list(self.context)[-frames:] if frames > 0 else []
        return np.asarray(recent, np.int32).reshape(-1, CODE_LEVELS)

    def attach_decoder(self, delay_frames: int) -> None:
        """Called by the engine when the session joins it: the codec's decoder hands
        out a frame's audio `delay_frames` steps after the frame's codes
        (`Variant.decoder_delay_frames`). A session moved between engines keeps its
        count, as it keeps its decoder state."""
        if self._decoding is None:
            self._decoding = collections.deque([None] * delay_frames)

    @property
    def audio_in_decoder(self) -> bool:
        """Whether a sampled frame is still inside the decoder's delay: the next steps
        owe its audio to the listener, so they must hand out audio one step at a time."""
        return self._decoding is not None and any(c is not None for c in self._decoding)

    @property
    def decoder_delay(self) -> int:
        """Steps between a frame's codes and its audio (0 until the session joins)."""
        return len(self._decoding) if self._decoding is not None else 0

    def record(self, codes: np.ndarray, *, forced: bool) -> np.ndarray | None:
        """Called by the engine after each step with the frame's codes. When the step's
        audio is the listener's (the frame sampled `decoder_delay` steps ago), returns
        the codes that entered the context since the frame heard before it, up to and
        including its own (int32 [k, 12], the last row its own): the loop codes forced
        in between, then it. None for silence before the first one and for the decode
        of forced loop codes (which is why a loop's continuation starts exactly on the
        bar line). The codes travel with the audio so that a stream moved to another
        replica continues from the context its listener heard, a loop or reseed
        included."""
        codes = np.asarray(codes, np.int32)
        self.context.append(codes)
        self._since_heard += 1
        if forced:
            self.frames_forced += 1
        else:
            self.frames_generated += 1
        if self._decoding is None:
            raise RuntimeError(f"session {self.id} stepped outside an engine")
        self._decoding.append(None if forced else codes)
        heard = self._decoding.popleft()
        if heard is None:
            return None
        # the frames after the one heard are those still inside the decoder's delay
        keep = len(self._decoding)
        since = min(self._since_heard, len(self.context))  # older ones left the context
        self._since_heard = keep
        through = [self.context[-i] for i in range(since, keep, -1)]
        return through[0][None] if len(through) == 1 else np.stack(through)

    def set_style(self, embedding: np.ndarray, ramp_seconds: float = 0.0) -> None:
        check_ramp_seconds(ramp_seconds)  # the first style too, which has no glide
        if self._ramp is None:
            self._ramp = StyleRamp(embedding)
        else:
            self._ramp.set_target(embedding, ramp_seconds)

    def style_ramp(self) -> RampState | None:
        """The style glide in progress, for a stream to carry to another replica."""
        return self._ramp.state() if self._ramp is not None else None

    def resume_style_ramp(self, state: RampState) -> None:
        """Goes on with a glide begun in the session this one continues."""
        if self._ramp is not None:
            self._ramp.resume(state)

    def update_controls(self, **changes) -> None:
        """Applies changes atomically: all valid, or none applied."""
        self.controls = self.controls.with_changes(**changes)

    def _style_tokens(self, style_model: StyleModel) -> np.ndarray | None:
        if self._ramp is None:
            return None
        embedding = self._ramp.next_frame()
        if embedding is not self._tokens_for:  # tokenize only when the style moved
            self._tokens = style_model.tokenize(embedding)
            self._tokens_for = embedding
        return self._tokens

    def next_frame_inputs(self, style_model: StyleModel) -> FrameInputs:
        """Conditioning, sampling controls and (while prefilling) forced codes for the
        next frame."""
        c = self.controls
        drums = c.drums
        if self.pulse is not None and drums == "free" and not self._prefill:
            drums = "on" if self.pulse.next_frame() else "free"
        block = build_block(
            self._style_tokens(style_model), self.notes.next_frame(), DRUMS[drums], c.cfg
        )
        forced = self._prefill.popleft() if self._prefill else None
        return FrameInputs(block, (c.temperature, c.top_k), forced)
