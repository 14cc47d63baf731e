"""The batched engine: one jitted step advances every session by one 40 ms frame.

Model state for all sessions lives in one batched pytree of `capacity` rows (a
bucket size: 1, 2, 4, 8, ...). Sessions occupy rows ("slots"); joining writes a
fresh per-seed state into a free row, leaving frees the row. When the sessions no
longer fit, or fit in a bucket half the size, the rows are gathered into a state of
the new capacity. Each bucket's step is compiled once (`warmup`), so a session
joining never waits on XLA. Empty rows compute throwaway audio: rows never mix.

A session prefilling a loop takes its queued codes in forced runs (`prefill_runs`:
4, 16 or 64 frames in one call to `StreamingModel.prefill`, at most one run per
step, so the sessions streaming beside it wait one run at most) instead of one
forced frame per step; what no run fits goes frame by frame in the batched step.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
from collections.abc import Callable, Iterable

import jax
import numpy as np

from ..styles import StyleModel
from .device import on_cpu, program_memory_gb
from .model import CONDITIONING_TOKENS, State, StreamingModel, neutral_step_inputs
from .session import CODE_LEVELS, Session

log = logging.getLogger(__name__)

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32)
# Longest forced run: each size is one more compile at warm-up, and a run holds up
# the batched step it goes with (2-core CPU, tiny: a 16-frame run 9.7 ms, one batch-1
# step 3.5-3.9 ms; not yet measured on a GPU).
DEFAULT_PREFILL_RUN_FRAMES = 64


def min_rows() -> int:
    """The fewest rows a step should run with on JAX's default backend.

    Measured on an H100 (scripts/bench_engine.py, bfloat16, random weights): a
    batch-1 step is 4-5x slower than a batch-2 step (mrt2_base 61-64 ms against
    12-15 ms, mrt2_small 17.6 against 6.1 ms; the depthformer is what slows down,
    and not through XLA's Triton GEMMs: disabling them changed nothing). A lone
    session on a GPU therefore shares its step with one throwaway row. On CPU a
    single row is the cheapest step, so it stays 1 there.
    """
    return 1 if on_cpu() else 2


class CapacityError(RuntimeError):
    """The engine already holds its maximum number of sessions."""


@jax.jit
def _gather_rows(state: State, rows: jax.Array) -> State:
    return jax.tree.map(lambda a: a[rows], state)


@jax.jit
def _put_row(state: State, row_state: State, row: jax.Array) -> State:
    return jax.tree.map(lambda a, r: a.at[row].set(r[0]), state, row_state)


@dataclasses.dataclass
class Frame:
    """One session's output of one step: the frame's codes, and 40 ms of audio made
    from an earlier step's codes (the decoder's delay, `Variant.decoder_delay_frames`).
    A `forced` frame replayed a loop into the state. The audio is the listener's only
    when `audible`, i.e. the frame it was made from was sampled: the step right after
    a session starts or a loop goes in hands out silence or the loop's own decode."""

    audio: np.ndarray  # int16 [1920, 2]; a forced run: [n_frames * 1920, 2]
    codes: np.ndarray  # int32 [12]; a forced run: [n_frames, 12]
    forced: bool
    # int32 [k, 12], if audible: the context's codes through the frame `audio` was made
    # from (any loop codes forced since the frame heard before it, then its own)
    heard: np.ndarray | None
    n_frames: int = 1  # steps this covers: more than one for a forced run

    @property
    def audible(self) -> bool:
        return self.heard is not None


@dataclasses.dataclass
class PendingStep:
    """A dispatched step: device arrays until `fetch` brings them to host."""

    rows: list[tuple[int, Session]]
    force: np.ndarray  # per row: it takes forced codes (a frame, or a run)
    audio: jax.Array | np.ndarray | None  # None: only forced runs this step
    codes: jax.Array | np.ndarray | None
    # row -> (the run's audio, its forced codes [k, 12]) for rows forced in a run
    runs: dict[int, tuple[jax.Array | np.ndarray, np.ndarray]] = dataclasses.field(
        default_factory=dict)
    started: float = 0.0  # perf_counter as its dispatch began (the generator's step timing)

    @property
    def frames(self) -> int:
        """Frames this step generates: one per stepped row, a run's length per forced
        run; counted at dispatch, so a session that leaves while its frame is computed
        still counts the frame that was computed."""
        return len(self.rows) - len(self.runs) + sum(len(forced) for _, forced in
                                                     self.runs.values())

    def fetch(self) -> PendingStep:
        """Waits for the step; the one host sync per step: the audio itself (and 48
        bytes of codes per row)."""
        self.audio, self.codes, self.runs = jax.device_get((self.audio, self.codes, self.runs))
        return self


@dataclasses.dataclass
class SessionSnapshot:
    """A session lifted out of the engine: host controls plus its model state on host."""

    session: Session
    state: State


class BatchedEngine:
    def __init__(
        self,
        model: StreamingModel,
        style_model: StyleModel,
        *,
        buckets: Iterable[int] = DEFAULT_BUCKETS,
        max_sessions: int | None = None,
        rows_at_least: int | None = None,
        prefill_run_frames: int = DEFAULT_PREFILL_RUN_FRAMES,
    ) -> None:
        self.model = model
        self.style_model = style_model
        # Run lengths, longest first: powers of 4 up to the limit (below 4: none, every
        # forced frame in the batched step). A loop's context is at most
        # `context_frames`, so longer runs would never be used.
        longest = min(prefill_run_frames, model.variant.context_frames)
        self.prefill_runs = tuple(4**i for i in range(4, 0, -1) if 4**i <= longest)
        floor = rows_at_least or min_rows()
        self.buckets = tuple(sorted({max(b, floor) for b in buckets}))
        self.max_sessions = max_sessions or self.buckets[-1]
        if self.max_sessions > self.buckets[-1]:
            raise ValueError(
                f"max_sessions: {self.max_sessions} exceeds the largest bucket {self.buckets[-1]}"
            )
        self._slots: list[str | None] = []
        self._sessions: dict[str, Session] = {}
        self._state: State | None = None

    # -- sessions -------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return len(self._slots)

    @property
    def sessions(self) -> dict[str, Session]:
        return self._sessions

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    def add(self, session: Session, state: State | None = None) -> None:
        """Places a session in a free row (a fresh state for its seed unless given)."""
        if session.id in self._sessions:
            raise ValueError(f"session_id: {session.id} is already running")
        if len(self._sessions) >= self.max_sessions:
            raise CapacityError(
                f"this replica is at its limit of {self.max_sessions} concurrent sessions"
            )
        if state is None:
            state = self.model.state_at(session.seed)
        if None not in self._slots:
            self._resize(self._bucket_for(len(self._sessions) + 1))
        row = self._slots.index(None)
        session.attach_decoder(self.model.decoder_delay_frames)
        self._state = _put_row(self._state, state, np.int32(row))
        self._slots[row] = session.id
        self._sessions[session.id] = session

    def remove(self, session_id: str) -> Session:
        session = self._sessions.pop(session_id)
        self._slots[self._slots.index(session_id)] = None
        target = self._bucket_for(len(self._sessions)) if self._sessions else 0
        if target <= self.capacity // 2:
            self._resize(target)
        return session

    def snapshot(self, session_id: str) -> SessionSnapshot:
        """Copies a session and its model state to host memory (to save or move it)."""
        row = self._slots.index(session_id)
        state = jax.device_get(_gather_rows(self._state, np.array([row], np.int32)))
        return SessionSnapshot(self._sessions[session_id], state)

    def restore(self, snapshot: SessionSnapshot) -> None:
        self.add(snapshot.session, self.model.on_device(snapshot.state))

    # -- batching -------------------------------------------------------------
    def _bucket_for(self, n: int) -> int:
        i = bisect.bisect_left(self.buckets, n)
        if i == len(self.buckets):
            raise CapacityError(f"no batch bucket holds {n} sessions (largest {self.buckets[-1]})")
        return self.buckets[i]

    def _resize(self, capacity: int) -> None:
        occupied = [i for i, s in enumerate(self._slots) if s is not None]
        if capacity == 0:
            self._state, self._slots = None, []
            return
        if self._state is None:
            fresh = self.model.state_at(0)
            self._state = _gather_rows(fresh, np.zeros(capacity, np.int32))
            self._slots = [None] * capacity
            return
        # Occupied rows first, then padding rows copied from row 0 (overwritten on join).
        rows = occupied + [0] * (capacity - len(occupied))
        self._state = _gather_rows(self._state, np.array(rows, np.int32))
        self._slots = [self._slots[i] for i in occupied] + [None] * (capacity - len(occupied))
        log.debug("engine capacity -> %d rows for %d sessions", capacity, len(occupied))

    def step(self, only: set[str] | None = None) -> dict[str, Frame]:
        """Generates the next frame for every session (or those in `only`).
        Sessions left out keep their state; prefilling sessions take a forced frame."""
        pending = self.dispatch(only)
        return self.finish(pending.fetch()) if pending is not None else {}

    def dispatch(self, only: set[str] | None = None) -> PendingStep | None:
        """Starts a step and returns at once: JAX runs it asynchronously, so the caller
        can deliver the previous step's audio meanwhile (`fetch`, then `finish`). The
        next dispatch may come before this one is fetched; the state orders them."""
        rows = [
            i for i, sid in enumerate(self._slots)
            if sid is not None and (only is None or sid in only)
        ]
        if not rows:
            return None
        run = self._next_run(rows)
        stepped = [i for i in rows if run is None or i != run[0]]
        audio = codes = None
        taking_codes = np.zeros(self.capacity, bool)
        if stepped:
            tokens, temperature, top_k, active, forced, force = self._frame_inputs(stepped)
            audio, codes, self._state = self.model.step(
                self.model.weights, tokens, temperature, top_k, active, forced, force,
                self._state
            )
            taking_codes |= force
        runs = {}
        if run is not None:
            row, frames = run
            runs[row] = self._force_run(row, frames)
            taking_codes[row] = True
        return PendingStep([(i, self._sessions[self._slots[i]]) for i in rows], taking_codes,
                           audio, codes, runs)

    def _next_run(self, rows: list[int]) -> tuple[int, int] | None:
        """The row to force a run of frames into this step, and how many: the session
        closest to the end of its loop (first audio soonest), once no audio it sampled
        is still owed by the decoder (a run hands out only the loop's own decode)."""
        if not self.prefill_runs:
            return None
        candidates = [
            (session.prefill_pending, row) for row in rows
            if (session := self._sessions[self._slots[row]]).prefill_pending
            >= self.prefill_runs[-1] and not session.audio_in_decoder
        ]
        if not candidates:
            return None
        pending, row = min(candidates)
        return row, next(k for k in self.prefill_runs if k <= pending)

    def _force_run(self, row: int, frames: int) -> tuple[jax.Array, np.ndarray]:
        """Dispatches `frames` of a session's queued loop codes into its row at once."""
        session = self._sessions[self._slots[row]]
        tokens, forced = session.next_forced_run(self.style_model, frames)
        index = np.array([row], np.int32)
        audio, row_state = self.model.prefill(
            self.model.weights, tokens[None], forced[None], _gather_rows(self._state, index)
        )
        self._state = _put_row(self._state, row_state, np.int32(row))
        return audio, forced

    def finish(self, pending: PendingStep) -> dict[str, Frame]:
        """Records a fetched step's codes in its sessions (those still here) and returns
        their frames."""
        frames = {}
        for i, session in pending.rows:
            if session.id not in self._sessions:
                continue  # left between dispatch and finish
            if i in pending.runs:
                audio, codes = pending.runs[i]
                heard = [h for c in codes if (h := session.record(c, forced=True)) is not None]
                frames[session.id] = Frame(audio[0], codes, True, heard[0] if heard else None,
                                           len(codes))
                continue
            forced = bool(pending.force[i])
            heard = session.record(pending.codes[i], forced=forced)
            frames[session.id] = Frame(pending.audio[i], pending.codes[i], forced, heard)
        return frames

    def _frame_inputs(self, rows: list[int]):
        cap = self.capacity
        tokens = np.zeros((cap, 144), np.int32)
        temperature = np.ones(cap, np.float32)
        top_k = np.full(cap, 40, np.int32)
        active = np.zeros(cap, bool)
        forced = np.zeros((cap, CODE_LEVELS), np.int32)
        force = np.zeros(cap, bool)
        for row in rows:
            session = self._sessions[self._slots[row]]
            inputs = session.next_frame_inputs(self.style_model)
            tokens[row], temperature[row], top_k[row] = inputs.block, *inputs.sampling
            if inputs.forced is not None:
                forced[row], force[row] = inputs.forced, True
            active[row] = True
        return tokens, temperature, top_k, active, forced, force

    # -- compilation ----------------------------------------------------------
    def warmup(
        self,
        buckets: Iterable[int] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Compiles all a session may need before sessions arrive, so that none joining
        or putting a loop in ever waits on XLA."""
        self.warmup_buckets(buckets, progress)
        self.warmup_runs()

    def warmup_buckets(
        self,
        buckets: Iterable[int] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Compiles the step (and row moves) for each bucket; `progress` after each."""
        fresh = self.model.state_at(0)
        previous = fresh
        for capacity in buckets or self.buckets:
            state = _gather_rows(fresh, np.zeros(capacity, np.int32))
            # the row moves of growing into and shrinking out of this bucket
            _gather_rows(previous, np.zeros(capacity, np.int32))
            _gather_rows(state, np.zeros(len(jax.tree.leaves(previous)[0]), np.int32))
            state = _put_row(state, fresh, np.int32(0))
            audio, _, state = self.model.step(
                self.model.weights, *neutral_step_inputs(capacity), state
            )
            jax.block_until_ready(audio)
            _gather_rows(state, np.zeros(1, np.int32))
            previous = state
            if progress:
                progress(capacity)

    def warmup_runs(self) -> None:
        """Compiles `StreamingModel.prefill` for each forced run length (one row)."""
        for frames in self.prefill_runs:
            jax.block_until_ready(self.model.prefill(*self._run_arguments(frames)))

    def _run_arguments(self, frames: int) -> tuple:
        return (self.model.weights, np.zeros((1, frames, CONDITIONING_TOKENS), np.int32),
                np.zeros((1, frames, CODE_LEVELS), np.int32), self.model.state_at(0))

    def step_memory_gb(self) -> dict[str, dict[str, float] | None]:
        """XLA's memory plan (`device.program_memory_gb`) of the step at each bucket
        ("step-8"), compiled as warm-up compiles it (from the compilation cache after a
        warm-up): what each needs beyond the weights and states, without running it."""
        fresh = self.model.state_at(0)
        plans = {}
        for capacity in self.buckets:
            state = _gather_rows(fresh, np.zeros(capacity, np.int32))
            lowered = self.model.step.lower(self.model.weights, *neutral_step_inputs(capacity),
                                            state)
            plans[f"step-{capacity}"] = program_memory_gb(lowered.compile())
        return plans

    def run_memory_gb(self) -> dict[str, dict[str, float] | None]:
        """The same for each forced run ("prefill-64"): one row, whatever the buckets."""
        return {f"prefill-{frames}": program_memory_gb(
                    self.model.prefill.lower(*self._run_arguments(frames)).compile())
                for frames in self.prefill_runs}
