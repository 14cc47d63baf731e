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
import functools
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable

import numpy as np

from . import checkpoints
from .audio.barclock import BarClock
from .engine import BatchedEngine, CapacityError, LoadedModel, Session, load_model
from .engine.batch import DEFAULT_BUCKETS, PendingStep
from .engine.device import device_name, memory_gb, on_cpu
from .engine.session import BeatPulse
from .engine.variants import CHANNELS, FRAMES_PER_SECOND, SAMPLE_RATE
from .errors import (
    ApiError,
    BadRequest,
    Conflict,
    OverCapacity,
    SessionLost,
    Unavailable,
    UnknownSession,
    clipped,
)
from .jam import Chunk, JamStream
from .jam_spec import JamSpec, JamUpdate, StyleSpec, make_session_id, replica_of
from .keyed_pool import KeyedPool
from .logs import PROGRESS_LOGGER, BurstWarning
from .loop_encoder import NoLoopEncoder, build_loop_encoder
from .metrics import GeneratorMetrics
from .model_switch import Candidate, Prepared, prepare, validate
from .replicas import variant_health, variant_model_status
from .selection import ModelSelection, SelectionRecord, SelectionStore, stored_for_boot
from .styles import blend

log = logging.getLogger(__name__)
progress = logging.getLogger(PROGRESS_LOGGER)

RECENT_AUDIO_SECONDS = 10.0
SELECTION_POLL_SECONDS = 2.0  # how soon other replicas follow a model switch
ENDED_SESSIONS_REMEMBERED = 1024
# How often a session's chunk stream looks whether its session finished while no chunk
# came (a stop or an ending wakes it at once).
STREAM_POLL_SECONDS = 5.0
# Replies first (`_let_replies_out`, CPU hosts): how long a step that completed chunks
# realtime clients wait for holds the next one at most, and how long it leaves the replies
# once they were taken. bench_serve, tiny, 8 realtime sessions, 0.5 s chunks through Ray
# on the 2-core box, alternated: overhead p50 5.76 -> 5.14 ms, p90 8.76 -> 7.69 ms (median
# of 9 runs each, a modest gain; 2 ms here and 6 ms gave the same); docs/performance.md.
REPLY_HOLD_SECONDS = 0.010
REPLY_SECONDS = 0.002
# A session nobody has asked about for this long is ended (its client is gone): a
# WebSocket stream asks at least every few seconds, a polling client every chunk.
IDLE_SESSION_SECONDS = 300.0
# Threads matching bar-mode chunks' loudness: sessions in parallel, each in order.
FINISHING_WORKERS = min(4, os.cpu_count() or 1)


@dataclasses.dataclass
class OpenStream:
    """A session's open `chunks` stream as the generator counts it: how many chunks it
    may still send (the consumer's side is `api.flow.StreamCredit`), and the wake-up
    for more."""

    left: int
    more: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)


class _Stopped(Exception):
    """Shutdown asked for while the replica compiles: its boot ends between compiles."""


class GeneratorCore:
    """`name` is the generator's name in the config (sessions carry it); the model it
    serves (`selection`) can change while it runs, see `select`."""

    def __init__(
        self,
        variant: str,
        *,
        name: str | None = None,
        repo: str | None = None,
        step: int | None = None,
        max_sessions: int = 16,
        buckets: tuple[int, ...] | None = None,
        compute_dtype: str = "auto",
        replica_tag: str = "local",
        loaded: LoadedModel | None = None,
        store: SelectionStore | None = None,
        metrics: GeneratorMetrics | None = None,
        selection_poll_seconds: float = SELECTION_POLL_SECONDS,
        idle_seconds: float = IDLE_SESSION_SECONDS,
        random_weights_seed: int | None = None,
    ) -> None:
        self.name = name or variant
        self.idle_seconds = idle_seconds
        self.replica_tag = replica_tag
        self.max_sessions = max_sessions
        self.buckets = tuple(buckets or DEFAULT_BUCKETS)
        self.compute_dtype = compute_dtype
        # benchmarks: boot on random weights, whatever model was selected before
        self.random_weights_seed = random_weights_seed
        self.boot_selection = ModelSelection(variant, repo, step)
        self.selection = self.boot_selection
        self.generation = 0  # of the stored selection this replica serves
        self.store = store
        self.metrics = metrics or GeneratorMetrics()
        self.switch: dict = {"state": "idle"}  # the last model switch, for /model/status
        self.state = "initializing"
        self.error: str | None = None
        self.warmed: list[int] = []
        self.device: str | None = None  # where JAX computes, once its backend is up
        self.loaded: LoadedModel | None = None
        self.engine: BatchedEngine | None = None
        self.encoder = NoLoopEncoder(self.name, "not loaded yet")
        self._jams: dict[str, JamStream] = {}
        self._events: dict[str, asyncio.Event] = {}
        self._streams: dict[str, OpenStream] = {}  # open `chunks` streams, by session
        self._ended: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._polled: set[str] = set()  # sessions started with JamSpec.polled
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.RLock()
        self._switch_lock = threading.Lock()
        self._wake = threading.Event()
        self._taken = threading.Event()  # a waiting caller took its chunk (replies first)
        self._replies_first = False  # set at boot: where steps compute on this host's CPU
        self._stopping = False
        self._poll_seconds = selection_poll_seconds
        self._follower: threading.Thread | None = None
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self.steps = 0
        self.step_seconds = 0.0
        self._last_step_done = 0.0  # perf_counter when the last step's audio reached host
        self._next_expiry_check = 0.0
        # sessions newly behind real time: one line at once, then one every 10 s at most
        self._behind_log = BurstWarning(
            log, f"generator {self.name}: sessions that fell behind real time")
        self.prefill_frames = 0
        # bar-mode chunks' loudness matching, off the step loop (serve_app/keyed_pool.py)
        self._finisher = KeyedPool(FINISHING_WORKERS, f"finish-{self.name}")
        self._thread = threading.Thread(
            target=self._boot_and_run, args=(loaded,), name=f"generator-{self.name}", daemon=True,
        )
        self._thread.start()

    @property
    def variant(self) -> str:
        """The model variant (architecture) served now."""
        return self.selection.variant

    # -- lifecycle ------------------------------------------------------------
    def _stored(self) -> SelectionRecord | None:
        """The selection made on any replica of this generator (see stored_for_boot)."""
        return stored_for_boot(self.store, self.name, self.boot_selection)

    def _load(self, selection: ModelSelection) -> LoadedModel:
        return load_model(selection.variant, repo=selection.repo, step=selection.step,
                          revision=selection.revision, assets_repo=selection.assets_repo,
                          compute_dtype=self.compute_dtype)

    def _boot_and_run(self, loaded) -> None:
        started = time.monotonic()
        try:
            # first, so that a replica whose model fails to load (out of GPU memory, say)
            # still says where it tried
            self.device = device_name()
            self._replies_first = on_cpu()  # a step would take the replies' cores
            random = self.random_weights_seed is not None
            record = None if loaded is not None or random else self._stored()
            if record is not None:
                try:
                    progress.info("generator %s: loading the selected model, %s, on %s",
                                  self.name, record.selection.label(), self.device)
                    loaded = self._load(record.selection)
                    self.selection, self.generation = record.selection, record.generation
                except Exception as e:  # serve the boot default rather than nothing
                    log.error("generator %s: the selected model failed to load (%s); "
                              "serving the boot default", self.name, e)
                    self.generation = record.generation
            if loaded is None:
                what = (f"{self.variant} with random weights" if random
                        else self.boot_selection.label())
                progress.info("generator %s: loading %s on %s", self.name, what, self.device)
                loaded = (load_model(self.variant, random_weights_seed=self.random_weights_seed,
                                     compute_dtype=self.compute_dtype) if random
                          else self._load(self.boot_selection))
            self.loaded = loaded
            self.engine = self._make_engine(loaded, on_bucket=self.warmed.append)
            self.encoder = build_loop_encoder(loaded, self.name)
            self._report_device_memory()
            self.state = "ready"
            progress.info("generator %s: ready after %.0f s on %s (buckets %s)", self.name,
                          time.monotonic() - started, self.device, list(self.engine.buckets))
        except _Stopped:
            self.state, self.error = "stopped", "shut down while compiling"
            progress.info("generator %s: stopped while compiling", self.name)
            return
        except Exception as e:  # reported by /health instead of a crash loop
            log.exception("generator %s: failed to start after %.0f s", self.name,
                          time.monotonic() - started)
            self.state, self.error = "error", f"{type(e).__name__}: {e}"
            return
        if self.store is not None and not self._stopping:
            self._follower = threading.Thread(target=self._follow_store, daemon=True,
                                              name=f"selection-{self.name}")
            self._follower.start()
        self._run()

    def _make_engine(self, loaded: LoadedModel,
                     on_bucket: Callable[[int], None] | None = None) -> BatchedEngine:
        """An engine for `loaded`, compiled for every batch bucket and forced run length
        before it serves; each is a progress line (minutes in all for a GPU variant
        without the cache)."""
        buckets = tuple(b for b in self.buckets if b <= max(self.max_sessions, 1))
        needed = min((b for b in self.buckets if b >= self.max_sessions), default=None)
        if needed and needed not in buckets:
            buckets = (*buckets, needed)
        engine = BatchedEngine(loaded.model, loaded.style, buckets=buckets,
                               max_sessions=self.max_sessions)
        progress.info("generator %s: compiling %d batch buckets %s", self.name, len(buckets),
                      list(buckets))
        done: list[int] = []
        since = time.monotonic()

        def compiled(bucket: int) -> None:
            nonlocal since
            done.append(bucket)
            progress.info("generator %s: compiled batch bucket %d (%d of %d) in %.1f s",
                          self.name, bucket, len(done), len(buckets), time.monotonic() - since)
            since = time.monotonic()
            if on_bucket:
                on_bucket(bucket)
            if self._stopping:  # leave XLA now rather than after every compile
                raise _Stopped

        engine.warmup_buckets(progress=compiled)
        if self._stopping:
            raise _Stopped
        engine.warmup_runs()
        progress.info("generator %s: compiled forced runs of %s frames (loop prefill) in %.1f s",
                      self.name, list(engine.prefill_runs), time.monotonic() - since)
        return engine

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stops the step loop and waits (up to `timeout`) for its threads to leave XLA:
        a thread killed inside a computation at interpreter exit aborts the process. A
        replica still compiling stops after the compile under way (`_Stopped`)."""
        self._stopping = True
        self._wake.set()
        self._finisher.shutdown()
        for thread in (self._thread, self._follower):
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout)

    def _run(self) -> None:
        """The step loop, pipelined one step deep: step k+1 is dispatched before step k's
        audio is fetched and delivered, so the device computes while the host hands out
        chunks; on a CPU host, not when step k completes chunks realtime clients wait for
        (replies first). Joins, leaves and switches happen between iterations, under the
        lock."""
        pending: PendingStep | None = None
        while not self._stopping:
            try:
                with self._lock:
                    now = time.monotonic()
                    if now >= self._next_expiry_check:
                        self._next_expiry_check = now + 1.0
                        self.expire_idle(now)
                        self._report_device_memory()
                        self._behind_log.flush()
                    due = self._due(now)
                    # Replies first: a step that completes chunks realtime clients wait
                    # on is delivered before the next one is dispatched, and the replies
                    # get a moment to leave, so that they do not wait for cores behind it.
                    awaited = (self._awaited(pending) if pending is not None
                               and self._replies_first else set())
                    following = self._dispatch(due) if due and not awaited else None
                if pending is not None:
                    completed = self._deliver(pending)
                    if awaited:
                        self._let_replies_out({sid: index for sid, index in completed.items()
                                               if sid in awaited})
                pending = following
            except Exception as e:
                log.exception("generator %s: step failed", self.name)
                self.state, self.error = "error", f"step failed: {type(e).__name__}: {e}"
                return
            if pending is None:
                with self._lock:
                    now = time.monotonic()
                    if self._due(now):
                        continue  # due again now that the delivered frames count
                    wait = self._seconds_until_due(now)
                self._wake.wait(timeout=wait)
                self._wake.clear()

    def _report_device_memory(self) -> None:
        """The `mrt_device_memory_gb` gauge, once a second from the step loop (a cheap
        query of the allocator); nothing on CPU, whose allocator keeps no count."""
        memory = memory_gb()
        if memory is not None and "in_use" in memory:
            self.metrics.record("mrt_device_memory_gb", memory["in_use"])

    def expire_idle(self, now: float | None = None) -> list[str]:
        """Ends the sessions nobody has asked about for `idle_seconds` (a polled jam
        whose client crashed would hold its slot for good) and returns their ids.
        The step loop calls it about once a second."""
        now = time.monotonic() if now is None else now
        with self._lock:
            idle = [sid for sid, jam in self._jams.items()
                    if not jam.waiting and now - jam.last_request > self.idle_seconds]
            for sid in idle:
                log.info("generator %s: session %s expired (no request for %g s)", self.name,
                         sid, self.idle_seconds)
                self._drop(sid, f"expired: no request for {self.idle_seconds:g} s; "
                                "start a new session")
        return idle

    def _due(self, now: float) -> set[str]:
        due = {sid for sid, jam in self._jams.items() if jam.due(now)}
        if due:
            # Realtime sessions started at different moments fall due at different phases
            # of the 40 ms grid; whoever is due within the next frame joins this step (at
            # most one frame early, inside its lead), so they share one batched step
            # instead of each taking its own.
            soon = now + 1.0 / FRAMES_PER_SECOND
            due |= {sid for sid, jam in self._jams.items() if jam.due(soon)}
        return due

    def _seconds_until_due(self, now: float) -> float:
        times = [t for jam in self._jams.values() if (t := jam.next_due_at()) is not None]
        return max(0.0, min(times) - now) if times else 0.5

    def _dispatch(self, due: set[str]) -> PendingStep | None:
        # Timed from before the dispatch: building its inputs and the call into JAX are
        # the step's too (on the H200 the server's step read 5.6 ms at 2 rows where the
        # engine benchmark, timing dispatch and all, read 12.1; docs/performance.md).
        started = time.perf_counter()
        pending = self.engine.dispatch(only=due)
        if pending is not None:
            pending.started = started
            for row, session in pending.rows:
                self._jams[session.id].step_dispatched(bool(pending.force[row]))
        return pending

    def _awaited(self, pending: PendingStep) -> set[str]:
        """The realtime sessions whose chunk `pending` completes while a caller waits for
        it (an asap stream's next step is its next chunk: holding it would only slow it)."""
        return {session.id for _, session in pending.rows
                if (jam := self._jams.get(session.id)) is not None and jam.waiting
                and jam.config.pace == "realtime" and jam.completing}

    def _let_replies_out(self, completed: dict[str, int]) -> None:
        """Holds the step loop until the waiting callers have taken the chunks just
        completed ({session: chunk index}), and REPLY_SECONDS more for the replies to
        leave, but no longer than REPLY_HOLD_SECONDS in all: on a CPU host the next
        step would take every core from them (the lead absorbs the wait)."""
        began = time.monotonic()
        deadline = began + REPLY_HOLD_SECONDS
        while True:
            self._taken.clear()  # before looking: a take after the look wakes the wait
            with self._lock:
                untaken = [sid for sid, index in completed.items()
                           if (jam := self._jams.get(sid)) is not None
                           and jam.delivered < index]
            remaining = deadline - time.monotonic()
            if not untaken or remaining <= 0:
                break
            self._taken.wait(remaining)
        time.sleep(max(0.0, min(REPLY_SECONDS, deadline - time.monotonic())))
        self.metrics.record("mrt_reply_hold_ms", 1000 * (time.monotonic() - began))

    def _deliver(self, pending: PendingStep) -> dict[str, int]:
        """Waits for a dispatched step (outside the lock: API calls go on meanwhile), then
        hands each session its frame; returns {session: index} of the chunks completed."""
        pending.fetch()
        done = time.perf_counter()
        # Pipelined, a step is dispatched while the one before it still runs and cannot
        # start before that one ends: counted from its dispatch, a step of a busy loop
        # would take in its predecessor's time too and read about twice its own.
        seconds = done - max(pending.started, self._last_step_done)
        self._last_step_done = done
        with self._lock:
            frames = self.engine.finish(pending)
            for row, session in pending.rows:
                if (jam := self._jams.get(session.id)) is not None:
                    jam.step_landed(bool(pending.force[row]))
            self.step_seconds += seconds
            self.steps += 1
            self.batch_sizes[len(frames)] += 1
            self.metrics.record("mrt_step_ms", 1000 * seconds)
            self.metrics.record("mrt_frames", pending.frames)
            now = time.monotonic()
            completed, cut = {}, []
            for sid, frame in frames.items():
                jam = self._jams[sid]
                jam.last_batch_size = len(frames)
                if frame.audible:
                    if (chunk := jam.push(frame.audio, now, frame.heard)) is not None:
                        completed[sid] = chunk.index
                        self._chunk_done(jam)
                    elif jam.unfinished:
                        cut.append((sid, jam))
                if frame.forced:
                    self.prefill_frames += frame.n_frames
                    if not jam.session.prefill_pending:
                        jam.prefill_done(now)
                else:
                    jam.reseed_at_boundary()
            self.metrics.record("mrt_handout_ms", 1000 * (time.perf_counter() - done))

        for sid in completed:
            self._notify(sid)
        for sid, jam in cut:
            self._finisher.submit(sid, functools.partial(self._finish_bars, sid, jam))
        return completed

    def _finish_bars(self, session_id: str, jam: JamStream) -> None:
        """In a finisher worker: one chunk of bars cut by the step loop, loudness-matched
        and handed to its client."""
        taken = jam.take_cut()
        if taken is None:
            return
        cut, started_at = taken
        try:
            chunk = jam.finish(cut)
        except Exception as e:
            log.exception("generator %s: session %s: finishing a chunk failed", self.name,
                          session_id)
            with self._lock:
                if self._jams.get(session_id) is jam:
                    self._drop(session_id, f"internal error finishing chunk: {type(e).__name__}")
            return
        with self._lock:
            if self._jams.get(session_id) is not jam:
                return  # stopped meanwhile
            jam.land(chunk, started_at, time.monotonic())
            self._chunk_done(jam)
        self._notify(session_id)

    def _chunk_done(self, jam: JamStream) -> None:
        """Counts the chunk `jam` just completed (or landed), and whether it was late."""
        self.metrics.record("mrt_chunks")
        self.metrics.record("mrt_chunk_latency_ms", 1000 * jam.last_chunk_latency)
        if jam.last_chunk_late:
            self.metrics.record("mrt_underruns")
            if jam.underruns == 1:  # logged once per session, then counted in status
                self._behind_log.add(jam.session.id, (
                    f"batch {jam.last_batch_size}, {self.mean_step_ms:.1f} ms mean per "
                    "40 ms frame"))

    def _notify(self, session_id: str) -> None:
        event = self._events.get(session_id)
        if event is not None and self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the caller's loop has closed
                self._loop.call_soon_threadsafe(event.set)

    # -- helpers --------------------------------------------------------------
    def _require_ready(self) -> None:
        if self.state != "ready":
            detail = f": {self.error}" if self.error else " (loading and compiling the model)"
            raise Unavailable(f"generator {self.name} is {self.state}{detail}",
                              replica=self.replica_tag)

    def _full(self) -> OverCapacity:
        return OverCapacity(f"generator {self.name} is full ({self.max_sessions} sessions per "
                            "replica); retry shortly or stop another session",
                            replica=self.replica_tag)

    def _jam(self, session_id: str) -> JamStream:
        jam = self._jams.get(session_id)
        if jam is not None:
            jam.last_request = time.monotonic()
            return jam
        if session_id in self._ended:  # an id of ours: whole
            raise UnknownSession(f"session {session_id} ended: {self._ended[session_id]}")
        owner = replica_of(session_id)
        if owner and owner != self.replica_tag:
            raise SessionLost(
                f"unknown session {clipped(session_id)}: it lived on generator replica "
                f"{clipped(owner)}, "
                f"which is no longer running{SessionLost.ADVICE}"
            )
        raise UnknownSession(f"unknown session {clipped(session_id)} (stopped, expired or never "
                             "started)")

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
        if self.session_count >= self.max_sessions:  # before encoding a loop for nothing
            raise self._full()
        seed = spec.seed if spec.seed is not None else int(np.random.default_rng().integers(2**31))
        session_id = make_session_id(self.name, self.replica_tag)
        try:
            session = Session(
                self._style_embedding(spec.style), seed=seed, controls=spec.controls,
                notes=spec.notes, session_id=session_id,
                context_frames=self.loaded.variant.context_frames,
            )
            if spec.style_ramp is not None:
                session.resume_style_ramp(spec.style_ramp)
            if spec.tempo_guidance_bpm is not None:
                session.pulse = BeatPulse(spec.tempo_guidance_bpm)
            # in a thread: the chunker measures the loop's loudness (tens of ms)
            chunker = (await asyncio.to_thread(spec.bar.chunker, spec.loop)
                       if spec.bar is not None else None)
            jam = JamStream(session, spec.stream, chunker=chunker)
            if spec.heard is not None:
                session.prefill(spec.heard[-self.loaded.variant.context_frames:])
            elif spec.loop is not None:
                clock = spec.bar.clock if spec.bar is not None else BarClock(120.0)
                session.prefill(await asyncio.to_thread(self.encoder.codes, spec.loop, clock))
            if spec.reseed is not None:
                jam.reseed(spec.reseed, spec.reseed_chunk)
        except ValueError as e:
            raise BadRequest(str(e)) from e
        # read before the engine sees the session: its step thread may prefill a run of
        # it before this answers, and the answer says how much context it starts from
        prefill_frames = session.prefill_pending
        with self._lock:
            try:
                self.engine.add(session)
            except CapacityError as e:
                raise self._full() from e
            self._jams[session_id] = jam
            self._events[session_id] = asyncio.Event()
            if spec.polled:
                self._polled.add(session_id)
            self.metrics.record("mrt_sessions", len(self._jams))
        self.metrics.record("mrt_sessions_started")
        self._wake.set()
        return {
            "session_id": session_id,
            "variant": self.name,
            "model": self.selection.describe(),
            "seed": seed,
            "chunk_seconds": spec.stream.chunk_frames / FRAMES_PER_SECOND,
            "sample_rate": SAMPLE_RATE,
            "channels": CHANNELS,
            "crossfade_seconds": 0.0,  # the decoder is causal: chunks join seamlessly
            "steering_assets": self.loaded.steering.describe(),
            "prefill_frames": prefill_frames,
        }

    async def next_chunk(self, session_id: str, timeout: float = 10.0) -> Chunk | None:
        """The next undelivered chunk, waiting up to `timeout`; None if none came, or
        if the session was stopped while this waited: a stop racing the stream's
        own next call ends the stream, it is no error. A session that ended for a
        reason (expired, failed) still raises, so the client is told why."""
        self._loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout
        waited = False
        while True:
            with self._lock:
                if waited and session_id not in self._jams and session_id not in self._ended:
                    return None
                jam = self._jam(session_id)
                event = self._events[session_id]
                event.clear()
                chunk = jam.take_next()
                finished = jam.status()["finished"]
            if chunk is not None:
                self._wake.set()  # delivering may unblock a full backlog
                self._taken.set()
                return chunk
            remaining = deadline - time.monotonic()
            if finished or remaining <= 0:
                return None
            jam.waiting += 1
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except TimeoutError:
                return None
            finally:
                jam.waiting -= 1
            waited = True

    async def chunks(self, session_id: str, credit: int) -> AsyncIterator[Chunk]:
        """A session's chunks in order as they are made, for as long as it runs: one
        call per stream instead of a `next_chunk` call per chunk, which through Ray
        Serve is most of what a chunk costs between the engine and the client
        (docs/performance.md, "One stream per session").

        At most `credit` chunks, plus what `grant` adds: a transport buffers what a
        stream sends (gRPC several MB), so the caller's flow control bounds what this
        takes from the backlog through the credit, and generation pauses once the
        backlog is full, as when a `next_chunk` caller stops asking. Ends when the
        session is stopped or finished; raises, as `next_chunk` does, when it ended for
        a reason (expired, failed, its replica gone)."""
        if credit < 1:
            raise BadRequest(f"credit: must be at least 1 chunk, got {credit}")
        stream = self._streams[session_id] = OpenStream(credit)
        try:
            while True:
                if stream.left <= 0:
                    stream.more.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stream.more.wait(), STREAM_POLL_SECONDS)
                    chunk = None
                else:
                    chunk = await self.next_chunk(session_id, STREAM_POLL_SECONDS)
                if chunk is not None:
                    stream.left -= 1
                    yield chunk
                elif self._stream_over(session_id):
                    return
        finally:
            if self._streams.get(session_id) is stream:
                del self._streams[session_id]

    async def grant(self, session_id: str, chunks: int) -> dict:
        """`chunks` more for the session's stream (`chunks`) to send."""
        if chunks < 1:
            raise BadRequest(f"chunks: must be at least 1, got {chunks}")
        with self._lock:
            self._jam(session_id)  # a session that is gone says why
        stream = self._streams.get(session_id)
        if stream is None:
            raise BadRequest(f"session {session_id} has no chunk stream to grant chunks to")
        stream.left += chunks
        stream.more.set()
        return {"session_id": session_id, "credit": stream.left}

    def _stream_over(self, session_id: str) -> bool:
        with self._lock:
            if session_id in self._ended:
                self._jam(session_id)  # raises: the session ended for a reason
            jam = self._jams.get(session_id)
            return jam is None or jam.status()["finished"]

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
                "applies_from_frame": jam.next_frame,
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
        codes = await asyncio.to_thread(self.encoder.codes, loop, clock)
        if anchor.shape[0]:
            codes = np.concatenate([codes[anchor.shape[0]:], anchor])
        with self._lock:
            applies = self._jam(session_id).reseed(codes)
        self._wake.set()
        return {"session_id": session_id, "applies_from_chunk": applies,
                "context_frames": int(codes.shape[0]), "anchor_frames": int(anchor.shape[0]),
                "codes": codes}

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
                "variant": self.name,
                "model": self.selection.describe(),
                "seed": jam.session.seed,
                "temperature": c.temperature,
                "topk": c.top_k,
                "cfg": dict(c.cfg),
                "drums": c.drums,
                "last_step_batch_size": jam.last_batch_size,
                "prefill_pending_frames": jam.session.prefill_pending,
                "frames_forced": jam.session.frames_forced,
                "sessions_on_replica": len(self._jams),
                **self._behind_message(jam),
            }

    def _behind_message(self, jam: JamStream) -> dict:
        if not jam.underruns:
            return {}
        return {"message": (
            f"this session fell behind real time {jam.underruns} time(s): generator "
            f"{self.name} is overloaded (last step: {jam.last_batch_size} sessions, "
            f"{self.mean_step_ms:.1f} ms mean per 40 ms frame); expect gaps in playback")}

    @property
    def mean_step_ms(self) -> float:
        return 1000 * self.step_seconds / self.steps if self.steps else 0.0

    async def stop(self, session_id: str) -> dict:
        with self._lock:
            jam = self._jam(session_id)
            self._drop(session_id)
        return {"session_id": session_id, "stopped": True, "frames": jam.session.frames_generated}

    def _drop(self, session_id: str, reason: str | None = None) -> None:
        """Removes a session (caller holds the lock); with a `reason`, later calls for it
        are told why it ended. A waiting next_chunk, or chunk stream, wakes and sees it
        gone."""
        self.engine.remove(session_id)
        del self._jams[session_id]
        self._polled.discard(session_id)
        event = self._events.pop(session_id)
        if reason is not None:
            self._ended[session_id] = reason
            while len(self._ended) > ENDED_SESSIONS_REMEMBERED:
                self._ended.popitem(last=False)
        self.metrics.record("mrt_sessions", len(self._jams))
        stream = self._streams.get(session_id)  # one waiting for credit ends too
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(event.set)
                if stream is not None:
                    self._loop.call_soon_threadsafe(stream.more.set)

    async def stop_all(self) -> dict:
        """Ends this replica's polled jams; later calls for them are told why."""
        with self._lock:
            ids = list(self._polled)
            for sid in ids:
                self._drop(sid, "stopped by /jam/stop_all")
        return {"stopped": len(ids), "replica": self.replica_tag}

    async def progress(self, session_id: str) -> dict:
        with self._lock:
            jam = self._jams.get(session_id)
            if jam is None:
                return {}
            return {"n": jam.frames_out, "total": jam.config.total_frames,
                    "prefill_done": jam.session.frames_forced,
                    "prefill_pending": jam.session.prefill_pending}

    @property
    def session_count(self) -> int:
        return len(self._jams)

    async def health(self) -> dict:
        """The variant's health as the API reports it (serve_app/replicas.py): in-process
        this core is the variant's one replica."""
        return variant_health([await self.replica_health()])

    async def replica_health(self) -> dict:
        with self._lock:
            return {
                "variant": self.name,
                "model": self.selection.describe(),
                "replica": self.replica_tag,
                "state": self.state,
                "error": self.error,
                "device": self.device,
                "device_memory_gb": memory_gb(),
                # a benchmark's figures on random weights say so (speed is the same)
                "random_weights": bool(self.loaded and self.loaded.random_weights_seed
                                       is not None),
                "sessions": len(self._jams),
                "max_sessions": self.max_sessions,
                "compiled_buckets": list(self.warmed),
                "steps": self.steps,
                "mean_step_ms": self.mean_step_ms if self.steps else None,
                "batch_sizes": dict(self.batch_sizes),
                "loop_encoder": not isinstance(self.encoder, NoLoopEncoder),
                "prefill_frames": self.prefill_frames,
                "metrics": self.metrics.snapshot(),
                "switch": dict(self.switch),
                "selection_generation": self.generation,
            }

    # -- model management -------------------------------------------------------
    async def select(
        self,
        selection: ModelSelection,
        *,
        dry_run: bool = False,
        prewarm: bool = True,
        stop_active: bool = False,
        sync_assets: bool = True,
    ) -> dict:
        """Switches this generator to `selection`, live sessions and all.

        Everything is checked before anything changes (a dry run stops there). The new
        weights load beside the old ones and are swapped in between two steps, so
        sessions on the same architecture keep streaming without a gap; another
        architecture needs `stop_active` when sessions are live, and ends them with a
        message. With `prewarm` the call returns once the new model serves; without,
        once the checks pass (follow /model/status). Any failure keeps the old model.
        """
        self._require_ready()
        if not self._switch_lock.acquire(blocking=False):
            raise Conflict(f"model: generator {self.name} is already switching models "
                           f"({self.switch.get('target')}); retry when /model/status says done")
        try:
            self.switch = {"state": "validating", "target": selection.describe(),
                           "since": time.time()}
            candidate = await asyncio.to_thread(validate, selection, self.loaded)
            report = {"variant": self.name, "replica": self.replica_tag, "dry_run": dry_run,
                      "previous": self.selection.describe(), **candidate.report()}
            live = self.session_count
            if not candidate.same_architecture and live and not stop_active and not dry_run:
                raise Conflict(
                    f"stop_active: {live} live session(s) run {self.variant}, which cannot "
                    f"continue on {selection.variant} (another architecture); pass "
                    f"stop_active=true to end them, or pick a {self.variant} checkpoint")
        except BaseException as e:
            self._switch_failed(e, validating=True)
            self._switch_lock.release()
            raise
        if dry_run:
            self.switch = {"state": "idle", "last_dry_run": report}
            self._switch_lock.release()
            return {**report, "ok": True}
        job = asyncio.to_thread(self._switch_to, candidate, stop_active, sync_assets)
        if not prewarm:
            task = asyncio.ensure_future(job)
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # logged there
            return {**report, "ok": True, "state": "loading"}
        return {**report, **await job}

    def _switch_failed(self, error: BaseException, *, validating: bool = False) -> None:
        message = (error.message if isinstance(error, ApiError)
                   else f"{type(error).__name__}: {error}")
        # nothing was swapped: the old model never stopped serving
        self.switch = {**self.switch, "state": "failed", "error": message,
                       "failed_while": "validating" if validating else "loading",
                       "still_serving": self.selection.describe()}
        log.warning("generator %s: model switch to %s failed, still serving %s: %s",
                    self.name, self.switch.get("target"), self.selection.describe(), message)

    def _switch_to(self, candidate: Candidate, stop_active: bool, sync_assets: bool,
                   record: SelectionRecord | None = None) -> dict:
        """Loads, hands over, remembers (runs in a worker thread, holding the switch lock)."""
        try:
            self.switch = {**self.switch, "state": "loading"}
            try:
                prepared = prepare(candidate, self.loaded, name=self.name,
                                   compute_dtype=self.compute_dtype,
                                   make_engine=self._make_engine,
                                   keep_steering=not sync_assets)
            except BaseException as e:
                self._switch_failed(e)
                raise
            kept, ended = self._hand_over(prepared, stop_active, record)
            if record is None:  # our own choice: stored once it serves, under a new generation
                record = self._remember(candidate.selection)
                if record is not None:
                    self.generation = record.generation
            self.metrics.record("mrt_model_switches")
            result = {"ok": True, "state": "serving", "sessions_kept": kept,
                      "sessions_ended": ended, "load_seconds": round(prepared.seconds, 3),
                      "generation": self.generation}
            self.switch = {**result, "state": "done", "serving": candidate.selection.describe(),
                           "finished": time.time()}
            return result
        finally:
            self._switch_lock.release()

    def _hand_over(self, prepared: Prepared, stop_active: bool,
                   record: SelectionRecord | None) -> tuple[int, int]:
        """The swap itself, between two steps (the step loop holds the same lock). A
        followed switch publishes its generation with its selection, so no reader sees
        the new model under the old generation."""
        selection = prepared.candidate.selection
        with self._lock:
            ended = 0
            if prepared.engine is not None or stop_active:
                reason = (f"generator {self.name} switched from {self.variant} to "
                          f"{selection.variant}, another architecture; start a new session"
                          if prepared.engine is not None else
                          f"generator {self.name} switched models with stop_active; "
                          "start a new session")
                for sid in list(self._jams):
                    self._drop(sid, reason)
                    ended += 1
            if prepared.engine is not None:
                self.engine = prepared.engine
            else:
                self.engine.model = prepared.loaded.model
            if record is not None:  # first: whoever sees the new selection sees this too
                self.generation = record.generation
            self.loaded, self.encoder, self.selection = (
                prepared.loaded, prepared.encoder, selection)
            kept = len(self._jams)
        log.info("generator %s: now serving %s (%d sessions kept, %d ended)",
                 self.name, selection.describe(), kept, ended)
        return kept, ended

    def _remember(self, selection: ModelSelection) -> SelectionRecord | None:
        """Stores the choice so every replica (restarted, or added later) serves it."""
        if self.store is None:
            return None
        current = self._stored()
        generation = max(self.generation, current.generation if current else 0) + 1
        record = SelectionRecord(selection, self.boot_selection, generation)
        try:
            self.store.put(self.name, record)
        except Exception as e:
            log.error("generator %s: could not store the selection (%s); other replicas "
                      "and restarts will not follow it", self.name, e)
            return None
        return record

    def _follow_store(self) -> None:
        """Other replicas' switches reach this one within a poll interval."""
        while not self._stopping:
            time.sleep(self._poll_seconds)
            record = self._stored()
            if record is None or record.generation <= self.generation:
                continue
            if not self._switch_lock.acquire(blocking=False):
                continue  # a switch is running here; look again next time
            log.info("generator %s: following selection %d: %s", self.name,
                     record.generation, record.selection.describe())
            self.switch = {"state": "validating", "target": record.selection.describe(),
                           "since": time.time(), "following": record.generation}
            try:
                candidate = validate(record.selection, self.loaded)
            except BaseException as e:
                self._switch_failed(e, validating=True)
                self.generation = record.generation  # do not retry a broken choice forever
                self._switch_lock.release()
                continue
            with contextlib.suppress(Exception):  # reported through self.switch
                self._switch_to(candidate, True, True, record)

    async def load_assets(self, repo: str, revision: str | None = None) -> dict:
        """Replaces the steering assets (mean style, centroids) of the model served now,
        e.g. a finetune's assets over base weights. Live sessions keep their blend; new
        styles and updates use the new assets."""
        self._require_ready()
        try:
            steering = await asyncio.to_thread(
                checkpoints.load_steering, checkpoints.Repo(repo, revision=revision))
        except checkpoints.CheckpointNotFound as e:
            raise BadRequest(f"repo_id: {e}") from e
        except ValueError as e:
            raise BadRequest(f"repo_id: {repo}: steering assets unusable ({e})") from e
        if steering.mean is None and steering.centroids is None:
            raise BadRequest(f"repo_id: {repo} has neither {checkpoints.MEAN_FILE} nor "
                             f"{checkpoints.CENTROIDS_FILE} at its root")
        if not self._switch_lock.acquire(blocking=False):
            raise Conflict(f"model: generator {self.name} is switching models; retry later")
        try:
            with self._lock:
                self.loaded = dataclasses.replace(self.loaded, steering=steering)
                selection = dataclasses.replace(self.selection, assets_repo=repo)
                self.selection = selection
            record = self._remember(selection)
            if record is not None:
                self.generation = record.generation
        finally:
            self._switch_lock.release()
        return {"variant": self.name, "assets_repo_id": repo,
                "steering_assets": steering.describe()}

    async def model_status(self) -> dict:
        """The variant's model status as the API reports it (serve_app/replicas.py):
        in-process this core is the variant's one replica."""
        return variant_model_status([await self.replica_model_status()])

    async def replica_model_status(self) -> dict:
        """What this replica serves, the last switch, and what the store says."""
        record = await asyncio.to_thread(self._stored)
        with self._lock:
            loaded = self.loaded
            return {
                "variant": self.name,
                "replica": self.replica_tag,
                "state": self.state,
                "error": self.error,
                "model": self.selection.describe(),
                "boot_default": self.boot_selection.describe(),
                "checkpoint": loaded.files.checkpoint.name if loaded and loaded.files else None,
                "steering_assets": loaded.steering.describe() if loaded else None,
                "loop_encoder": not isinstance(self.encoder, NoLoopEncoder),
                "sessions": len(self._jams),
                "max_sessions": self.max_sessions,
                "switch": dict(self.switch),
                "selection_generation": self.generation,
                "stored_selection": (
                    {**record.selection.describe(), "generation": record.generation}
                    if record else None),
            }
