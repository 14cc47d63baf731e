"""One generator replica's work, without Ray: a model, its batched engine, and a clock.

A background thread runs the clock: whenever any session is due (realtime ones
paced against wall clock, asap ones limited only by their backlog), it takes one
batched engine step for all due sessions and hands each its 40 ms frame. The
asyncio side (Ray Serve calls it) starts, updates and stops sessions between
steps and waits for chunks without blocking the thread.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import threading
import time
import uuid

import numpy as np

from .audio.barclock import BarClock
from .audio.bars import BarChunker
from .audio.context import tiled_context
from .audio.loudness import LoudnessMatcher
from .engine import BatchedEngine, CapacityError, Controls, LoadedModel, Session, load_model
from .engine.batch import DEFAULT_BUCKETS
from .engine.session import BeatPulse
from .engine.variants import CHANNELS, FRAMES_PER_SECOND, SAMPLE_RATE
from .errors import BadRequest, OverCapacity, Unavailable, UnknownSession
from .jam import Chunk, JamStream, StreamConfig
from .styles import blend

log = logging.getLogger(__name__)

SESSION_SEPARATOR = "@"
FRAME_SAMPLES_PER_BAR_PROBE = 96000  # 2 s of silence: compiles the encoder at boot
RECENT_AUDIO_SECONDS = 10.0


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

    def chunker(self, loop: np.ndarray | None) -> BarChunker:
        matcher = None
        if loop is not None and self.loudness_mode != "none":
            matcher = LoudnessMatcher(loop, self.loudness_mode, self.headroom_db, self.rate)
        return BarChunker(self.clock, self.bars_per_chunk, self.rate, matcher)


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


class GeneratorCore:
    def __init__(
        self,
        variant: str,
        *,
        repo: str | None = None,
        step: int | None = None,
        max_sessions: int = 16,
        buckets: tuple[int, ...] | None = None,
        compute_dtype: str = "auto",
        replica_tag: str = "local",
        loaded: LoadedModel | None = None,
    ) -> None:
        self.variant = variant
        self.replica_tag = replica_tag
        self.max_sessions = max_sessions
        self.buckets = tuple(buckets or DEFAULT_BUCKETS)
        self.state = "initializing"
        self.error: str | None = None
        self.warmed: list[int] = []
        self.loaded: LoadedModel | None = None
        self.engine: BatchedEngine | None = None
        self._jams: dict[str, JamStream] = {}
        self._events: dict[str, asyncio.Event] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stopping = False
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self.steps = 0
        self.step_seconds = 0.0
        self._encoder = None
        self._encoder_error = "not loaded yet"
        self.prefill_frames = 0
        self._thread = threading.Thread(
            target=self._boot_and_run,
            args=(repo, step, compute_dtype, loaded),
            name=f"generator-{variant}",
            daemon=True,
        )
        self._thread.start()

    # -- lifecycle ------------------------------------------------------------
    def _boot_and_run(self, repo, step, compute_dtype, loaded) -> None:
        try:
            log.info("generator %s: loading model", self.variant)
            self.loaded = loaded or load_model(
                self.variant, repo=repo, step=step, compute_dtype=compute_dtype
            )
            buckets = tuple(b for b in self.buckets if b <= max(self.max_sessions, 1))
            needed = min((b for b in self.buckets if b >= self.max_sessions), default=None)
            if needed and needed not in buckets:
                buckets = (*buckets, needed)
            engine = BatchedEngine(
                self.loaded.model, self.loaded.style, buckets=buckets,
                max_sessions=self.max_sessions,
            )
            engine.warmup(progress=self._warmed)
            self._warm_encoder()
            self.engine = engine
            self.state = "ready"
            log.info("generator %s: ready (buckets %s)", self.variant, buckets)
        except Exception as e:  # reported by /health instead of a crash loop
            log.exception("generator %s failed to start", self.variant)
            self.state, self.error = "error", f"{type(e).__name__}: {e}"
            return
        self._run()

    def _warm_encoder(self) -> None:
        """Loads and compiles the loop encoder (fixed input length: one compile). A repo
        without the encoder still serves style jams; loop requests then say why not."""
        try:
            self._encoder = self.loaded.audio_encoder()
            self._loop_codes(np.zeros((FRAME_SAMPLES_PER_BAR_PROBE, CHANNELS), np.float32),
                             BarClock(120.0))
            log.info("generator %s: loop encoder ready", self.variant)
        except Exception as e:
            self._encoder = None
            self._encoder_error = f"{type(e).__name__}: {e}"
            log.warning("generator %s: no loop encoder (%s)", self.variant, e)

    def _loop_codes(self, loop: np.ndarray, clock: BarClock) -> np.ndarray:
        """A loop's context codes [context_frames, 12], ending on a bar line."""
        if self._encoder is None:
            raise Unavailable(f"loop_audio: generator {self.variant} cannot encode audio "
                              f"({self._encoder_error})")
        frames = self.loaded.variant.context_frames
        return self._encoder.encode(tiled_context(loop, clock, frames))[-frames:]

    def _warmed(self, bucket: int) -> None:
        self.warmed.append(bucket)
        log.info("generator %s: compiled batch bucket %d", self.variant, bucket)

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()

    def _run(self) -> None:
        while not self._stopping:
            with self._lock:
                now = time.monotonic()
                due = {sid for sid, jam in self._jams.items() if jam.due(now)}
                if due:
                    # Realtime sessions started at different moments fall due at different
                    # phases of the 40 ms grid; whoever is due within the next frame joins
                    # this step (at most one frame early, inside its lead), so they share
                    # one batched step instead of each taking its own.
                    soon = now + 1.0 / FRAMES_PER_SECOND
                    due |= {sid for sid, jam in self._jams.items() if jam.due(soon)}
                wait = self._seconds_until_due(now) if not due else 0.0
            if not due:
                self._wake.wait(timeout=wait)
                self._wake.clear()
                continue
            try:
                self._step(due)
            except Exception as e:
                log.exception("generator %s: step failed", self.variant)
                self.state, self.error = "error", f"step failed: {type(e).__name__}: {e}"
                return

    def _seconds_until_due(self, now: float) -> float:
        times = [t for jam in self._jams.values() if (t := jam.next_due_at()) is not None]
        return max(0.0, min(times) - now) if times else 0.5

    def _step(self, due: set[str]) -> None:
        with self._lock:
            t0 = time.perf_counter()
            frames = self.engine.step(only=due)
            self.step_seconds += time.perf_counter() - t0
            self.steps += 1
            self.batch_sizes[len(frames)] += 1
            now = time.monotonic()
            completed = []
            for sid, frame in frames.items():
                jam = self._jams[sid]
                jam.last_batch_size = len(frames)
                if frame.forced:
                    self.prefill_frames += 1
                    if not jam.session.prefill_pending:
                        jam.prefill_done(now)
                    continue
                if jam.push(frame.audio, now) is not None:
                    completed.append(sid)
                    if jam.pending_context is not None:
                        jam.session.prefill(jam.pending_context)
                        jam.pending_context = None

        for sid in completed:
            self._notify(sid)

    def _notify(self, session_id: str) -> None:
        event = self._events.get(session_id)
        if event is not None and self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the caller's loop has closed
                self._loop.call_soon_threadsafe(event.set)

    # -- helpers --------------------------------------------------------------
    def _require_ready(self) -> None:
        if self.state != "ready":
            detail = f": {self.error}" if self.error else " (loading and compiling the model)"
            raise Unavailable(f"generator {self.variant} is {self.state}{detail}")

    def _jam(self, session_id: str) -> JamStream:
        jam = self._jams.get(session_id)
        if jam is not None:
            return jam
        owner = replica_of(session_id)
        if owner and owner != self.replica_tag:
            raise UnknownSession(
                f"unknown session {session_id}: it lived on generator replica {owner}, "
                "which is no longer running; start a new session"
            )
        raise UnknownSession(f"unknown session {session_id} (stopped, expired or never started)")

    def _style_embedding(self, style: StyleSpec) -> np.ndarray | None:
        if style.empty:
            return None
        try:
            return blend(
                style.embeddings, style.weights, steering=self.loaded.steering,
                mean=style.mean, centroid_weights=style.centroid_weights,
            )
        except ValueError as e:
            raise BadRequest(str(e)) from e

    # -- sessions -------------------------------------------------------------
    async def start(self, spec: JamSpec) -> dict:
        self._loop = asyncio.get_running_loop()
        self._require_ready()
        seed = spec.seed if spec.seed is not None else int(np.random.default_rng().integers(2**31))
        session_id = make_session_id(self.variant, self.replica_tag)
        try:
            session = Session(
                self._style_embedding(spec.style), seed=seed, controls=spec.controls,
                notes=spec.notes, session_id=session_id,
                context_frames=self.loaded.variant.context_frames,
            )
            if spec.tempo_guidance_bpm is not None:
                session.pulse = BeatPulse(spec.tempo_guidance_bpm)
            chunker = spec.bar.chunker(spec.loop) if spec.bar is not None else None
            jam = JamStream(session, spec.stream, chunker=chunker)
        except ValueError as e:
            raise BadRequest(str(e)) from e
        if spec.loop is not None:
            clock = spec.bar.clock if spec.bar is not None else BarClock(120.0)
            session.prefill(await asyncio.to_thread(self._loop_codes, spec.loop, clock))
        with self._lock:
            try:
                self.engine.add(session)
            except CapacityError as e:
                raise OverCapacity(
                    f"generator {self.variant} is full ({self.max_sessions} sessions per "
                    "replica); retry shortly or stop another session"
                ) from e
            self._jams[session_id] = jam
            self._events[session_id] = asyncio.Event()
        self._wake.set()
        return {
            "session_id": session_id,
            "variant": self.variant,
            "seed": seed,
            "chunk_seconds": spec.stream.chunk_frames / FRAMES_PER_SECOND,
            "sample_rate": SAMPLE_RATE,
            "channels": CHANNELS,
            "crossfade_seconds": 0.0,  # the decoder is causal: chunks join seamlessly
            "steering_assets": self.loaded.steering.describe(),
            "prefill_frames": session.prefill_pending,
        }

    async def next_chunk(self, session_id: str, timeout: float = 10.0) -> Chunk | None:
        """The next undelivered chunk, waiting up to `timeout`; None if none came."""
        self._loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                jam = self._jam(session_id)
                event = self._events[session_id]
                event.clear()
                chunk = jam.take_next()
                finished = jam.status()["finished"]
            if chunk is not None:
                self._wake.set()  # delivering may unblock a full backlog
                return chunk
            remaining = deadline - time.monotonic()
            if finished or remaining <= 0:
                return None
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except TimeoutError:
                return None

    async def consume(self, session_id: str, chunk_index: int) -> dict:
        with self._lock:
            jam = self._jam(session_id)
            try:
                jam.consume(chunk_index)
            except ValueError as e:
                raise BadRequest(str(e)) from e
        self._wake.set()
        return {"session_id": session_id, "consumed": chunk_index}

    async def update(self, session_id: str, update: JamUpdate) -> dict:
        with self._lock:
            jam = self._jam(session_id)
            session = jam.session
            try:
                if update.controls:
                    session.update_controls(**update.controls)
                if update.style is not None:
                    embedding = self._style_embedding(update.style)
                    if embedding is not None:
                        session.set_style(embedding, update.style_ramp_seconds)
                if update.notes is not None:
                    session.notes.set(update.notes)
            except ValueError as e:
                raise BadRequest(str(e)) from e
            return {
                "session_id": session_id,
                "applies_from_frame": session.frames_generated,
                "applies_from_chunk": jam.chunk_of_next_frame(),
            }

    async def reseed(self, session_id: str, loop: np.ndarray | None,
                     anchor_bars: float | None = None) -> dict:
        """Replaces the session's context at its next chunk boundary with a new loop
        (`reseed`), or with the new loop followed by the last `anchor_bars` bars of
        what it has been playing (`reseed_splice`: the model keeps its thread while
        the new material steers). Prefilling `context_frames` frames overwrites the
        whole attention window, so no state reset is needed."""
        with self._lock:
            jam = self._jam(session_id)
            clock = jam.chunker.clock if jam.chunker is not None else BarClock(120.0)
            anchor = np.zeros((0, 12), np.int32)
            if anchor_bars:
                frames = round(anchor_bars * clock.seconds_per_bar * FRAMES_PER_SECOND)
                anchor = jam.session.recent_context(
                    min(frames, self.loaded.variant.context_frames - 1))
        if loop is None:
            raise BadRequest("loop_audio: reseed needs new audio")
        codes = await asyncio.to_thread(self._loop_codes, loop, clock)
        if anchor.shape[0]:
            codes = np.concatenate([codes[anchor.shape[0]:], anchor])
        with self._lock:
            jam = self._jam(session_id)
            if jam.at_chunk_boundary:
                jam.session.prefill(codes)
            else:
                jam.pending_context = codes
            applies = jam.next_chunk_index + (0 if jam.at_chunk_boundary else 1)
        self._wake.set()
        return {"session_id": session_id, "applies_from_chunk": applies,
                "context_frames": int(codes.shape[0]), "anchor_frames": int(anchor.shape[0])}

    async def recent_audio(self, session_id: str, seconds: float = RECENT_AUDIO_SECONDS):
        """The last `seconds` of audio generated for the session (int16 [n, 2], 48 kHz)."""
        with self._lock:
            return self._jam(session_id).recent_audio(seconds)

    async def status(self, session_id: str) -> dict:
        with self._lock:
            jam = self._jam(session_id)
            c = jam.session.controls
            return {
                **jam.status(),
                "variant": self.variant,
                "seed": jam.session.seed,
                "temperature": c.temperature,
                "topk": c.top_k,
                "cfg": dict(c.cfg),
                "drums": c.drums,
                "last_step_batch_size": jam.last_batch_size,
                "prefill_pending_frames": jam.session.prefill_pending,
                "frames_forced": jam.session.frames_forced,
                "sessions_on_replica": len(self._jams),
            }

    async def stop(self, session_id: str) -> dict:
        with self._lock:
            jam = self._jam(session_id)
            self.engine.remove(session_id)
            del self._jams[session_id]
            event = self._events.pop(session_id)
        event.set()  # wake a waiting next_chunk so it sees the session is gone
        return {"session_id": session_id, "stopped": True, "frames": jam.session.frames_generated}

    async def stop_all(self) -> dict:
        with self._lock:
            ids = list(self._jams)
        for sid in ids:
            await self.stop(sid)
        return {"stopped": len(ids)}

    async def progress(self, session_id: str) -> dict:
        with self._lock:
            jam = self._jams.get(session_id)
            if jam is None:
                return {}
            return {"n": jam.session.frames_generated, "total": jam.config.total_frames,
                    "prefill_done": jam.session.frames_forced,
                    "prefill_pending": jam.session.prefill_pending}

    @property
    def session_count(self) -> int:
        return len(self._jams)

    async def health(self) -> dict:
        with self._lock:
            return {
                "variant": self.variant,
                "replica": self.replica_tag,
                "state": self.state,
                "error": self.error,
                "sessions": len(self._jams),
                "max_sessions": self.max_sessions,
                "compiled_buckets": list(self.warmed),
                "steps": self.steps,
                "mean_step_ms": 1000 * self.step_seconds / self.steps if self.steps else None,
                "batch_sizes": dict(self.batch_sizes),
                "loop_encoder": self._encoder is not None,
                "prefill_frames": self.prefill_frames,
            }
