"""A jam stream: a session's frames gathered into chunks, paced and bounded.

Frames arrive from the engine 40 ms at a time; chunks of `chunk_frames` leave to
the client. The decoder is causal, so consecutive chunks join without crossfade.
Memory is bounded by `max_backlog` chunks whatever the client does: when the
backlog is full, chunks the client already received are dropped first; if none
were, generation for this session waits for the client (`waited_on_client_seconds`):
the step loop is not woken for it meanwhile, and a realtime clock stops with it (the
client cannot have played what it did not take), so the chunks after the wait are
paced and judged late from where the client left off, not counted as the server's
underruns.

In bar mode a `BarChunker` cuts the frames into chunks of whole bars instead; the
step loop only cuts them (`take_cut`), and a worker matches their loudness (`finish`)
and hands them back (`land`). A session still prefilling a loop is always due (forced
frames make no audio for the client), and a realtime clock starts once the first
prefill is done.

Two counts move here, one step apart: frames *sampled* (`session.frames_generated`,
what pacing, updates and reseeds count) and frames *heard* (`frames_out`, what chunks
hold). The decoder hands a frame's audio out `session.decoder_delay` steps after its
codes, so a stream needs that many steps more than the audio it sends.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time

import numpy as np

from .audio.bars import BarChunker, BarCut
from .engine import Session
from .engine.session import CODE_LEVELS
from .errors import shown
from .frames import CHANNELS, FRAME_SAMPLES, FRAMES_PER_SECOND, SAMPLE_RATE
from .styles import RampState

PACES = ("realtime", "asap")
# A streamed chunk is held whole in the generator and the ingress until it is sent; a
# fixed-length render is one chunk of its whole length, bounded by the API instead.
MAX_CHUNK_SECONDS = 50


@dataclasses.dataclass
class Chunk:
    index: int
    audio: np.ndarray  # int16 [frames * 1920, 2]
    first_frame: int
    generated_at: float  # unix seconds when its last frame was generated
    rate: int = SAMPLE_RATE
    extra: dict = dataclasses.field(default_factory=dict)  # bar mode: bars, loudness
    # The context's codes since the chunk before (int32 [n, 12]), through the last frame
    # heard: what a stream moved to another replica is continued from
    # (`serve_app/api/resume.py`). The rows in `codes_forced` are loop codes forced in
    # (heard only through what follows); the others are the frames heard, frame
    # `codes_from` on. Not sent to clients. (A tuple, not an array: Ray's serializer
    # takes about 20 us per array.)
    codes: np.ndarray | None = None
    codes_from: int = 0
    codes_forced: tuple[int, ...] = ()
    # The style glide in progress when the chunk was cut (None: none): a moved stream
    # glides on from there. Not sent to clients either.
    style_ramp: RampState | None = None

    @property
    def seconds(self) -> float:
        return self.audio.shape[0] / self.rate

    def metadata(self) -> dict:
        return {
            "index": self.index,
            "sample_rate": self.rate,
            "channels": CHANNELS,
            "samples": int(self.audio.shape[0]),
            "seconds": self.seconds,
            "first_frame": self.first_frame,
            "generated_at": self.generated_at,
            "crossfade_seconds": 0.0,
            **self.extra,
        }


def frames_for(seconds: float) -> int:
    """Chunk length in whole 40 ms frames (at least one)."""
    return max(1, round(seconds * FRAMES_PER_SECOND))


@dataclasses.dataclass
class StreamConfig:
    chunk_frames: int = 50
    pace: str = "asap"
    max_backlog: int = 8
    lead_margin_frames: int = 5  # realtime: margin beyond one chunk ahead of wall clock
    total_frames: int | None = None  # fixed-length renders stop here

    @property
    def lead_frames(self) -> int:
        """Realtime streams run one chunk plus a margin ahead of wall clock, so the first
        chunk comes as fast as the model can make it and later ones never arrive late."""
        return self.chunk_frames + self.lead_margin_frames

    def validate(self) -> None:
        if self.pace not in PACES:
            raise ValueError(f"pace: must be one of {list(PACES)}, got {shown(self.pace)}")
        limit = self.total_frames or MAX_CHUNK_SECONDS * FRAMES_PER_SECOND
        if not 1 <= self.chunk_frames <= limit:
            raise ValueError(f"chunk_seconds: must be within 0.04..{MAX_CHUNK_SECONDS} seconds, "
                             f"got {self.chunk_frames / FRAMES_PER_SECOND:g}")
        if self.max_backlog < 1:
            raise ValueError("max_backlog: must be >= 1")


class JamStream:
    def __init__(self, session: Session, config: StreamConfig, *, clock=time.monotonic,
                 chunker: BarChunker | None = None, recent_seconds: float = 10.0):
        config.validate()
        self.session = session
        self.config = config
        self.chunker = chunker
        self.pending_context: np.ndarray | None = None  # reseed codes, waiting for a chunk
        self.pending_from_chunk = 0  # the chunk they open (`reseed`)
        self._recent: collections.deque[np.ndarray] = collections.deque(
            maxlen=max(1, round(recent_seconds * FRAMES_PER_SECOND)))
        self._clock = clock
        self.started = clock()
        self.created_at = time.time()
        self._frames: list[np.ndarray] = []
        # per frame pushed since the last chunk: its codes with those forced before it
        self._heard: list[np.ndarray] = []
        self._cut_codes: collections.deque[dict] = collections.deque()
        # bar mode: bars cut and not yet finished, with when their first frame came
        self._cuts: collections.deque[tuple[BarCut, float]] = collections.deque()
        self.unfinished = 0  # cut and not landed yet (taken by a worker or waiting)
        self.frames_out = 0  # frames of audio pushed into chunks
        self.backlog: collections.deque[Chunk] = collections.deque()
        self.next_chunk_index = 0
        self.delivered = -1  # highest chunk index handed to the client
        self.consumed = -1
        self.dropped_chunks = 0
        self.behind_frames = 0  # realtime frames that were due but late
        # Underruns (realtime): the client starts playing when chunk 0 is ready, so chunk
        # k is needed by then plus the audio before it; a chunk completed later is late.
        self.underruns = 0
        self._first_chunk: tuple[float, int] | None = None  # (ready at, first frame)
        self._chunk_started_at: float | None = None
        self.last_chunk_latency: float | None = None  # seconds, first frame -> complete
        self.last_chunk_late = False  # the last chunk completed counted as an underrun
        self.last_batch_size = 0  # sessions in the last step that advanced this one
        self._waiting_since: float | None = None  # the backlog full of chunks not taken
        self.waited_on_client_seconds = 0.0
        self.in_flight = 0  # frames dispatched to the device and not yet delivered here
        self.sampled_in_flight = 0  # of those, the ones sampled (not forced loop codes)
        # For the generator's idle expiry: the last call for this session, and the calls
        # waiting on it now (a long-poll or a render is a client still there).
        self.last_request = self.started
        self.waiting = 0

    # -- generation side ----------------------------------------------------
    @property
    def finished(self) -> bool:
        total = self.config.total_frames
        return total is not None and self.frames_out >= total

    @property
    def completing(self) -> bool:
        """The frames in flight complete a chunk (fixed-length chunks; bars are cut by
        finisher workers, off the step loop)."""
        return bool(self.in_flight and self.chunker is None
                    and len(self._frames) + self.in_flight >= self.config.chunk_frames)

    def _make_room(self) -> bool:
        """Room for one more frame: the backlog, counting the chunk that frames already in
        flight will complete, stays within `max_backlog`."""
        while len(self.backlog) + self.unfinished + self.completing >= self.config.max_backlog:
            if not self.backlog or self.backlog[0].index > self.delivered:
                return False  # the client has not seen it (or the frames in flight fill it)
            self.backlog.popleft()
            self.dropped_chunks += 1
        return True

    def step_dispatched(self, forced: bool) -> None:
        self.in_flight += 1
        self.sampled_in_flight += not forced

    def step_landed(self, forced: bool) -> None:
        self.in_flight -= 1
        self.sampled_in_flight -= not forced

    @property
    def next_frame(self) -> int:
        """The number of the next frame to be sampled: frames sampled and on their way.
        What pacing and length limits count, and where an update or reseed made now
        takes effect (controls are read when a step is dispatched)."""
        return self.session.frames_generated + self.sampled_in_flight

    def due(self, now: float) -> bool:
        if self.in_flight and self._reseed_is_next:
            return False  # a reseed starts exactly at the chunk boundary: wait for it
        if self.session.prefill_pending:
            return True
        total = self.config.total_frames
        if total is not None and self.next_frame >= total + self.session.decoder_delay:
            return False
        if not self._make_room():
            if self._waiting_since is None and self.backlog:  # a chunk the client has not
                self._waiting_since = now  # taken; not only chunks still being made
            return False
        if self._waiting_since is not None:
            self._client_caught_up(now)
        if self.config.pace == "realtime":
            return self.next_frame < self._frames_allowed(now)
        return True

    def _client_caught_up(self, now: float) -> None:
        """The client took chunks again after generation waited for it: a realtime
        clock (pacing, and when a chunk counts as late) moves on by the wait."""
        waited = max(0.0, now - self._waiting_since)
        self._waiting_since = None
        self.waited_on_client_seconds += waited
        if self.config.pace != "realtime":
            return
        self.started += waited
        if self._first_chunk is not None:
            ready_at, first_frame = self._first_chunk
            self._first_chunk = (ready_at + waited, first_frame)

    @property
    def _lead(self) -> int:
        """Realtime: frames sampled ahead of wall clock, so that the audio the client
        has is `lead_frames` ahead (the decoder holds the newest ones back)."""
        return self.config.lead_frames + self.session.decoder_delay

    def _frames_allowed(self, now: float) -> int:
        """Realtime: frames whose time has come (whole frames; 1e-6 absorbs float error)."""
        elapsed_frames = math.floor((now - self.started) * FRAMES_PER_SECOND + 1e-6)
        return elapsed_frames + self._lead

    def prefill_done(self, now: float) -> None:
        """A loop is in the state. Before the first audio, the realtime clock starts now."""
        if self.session.frames_generated == 0:
            self.started = now

    def next_due_at(self) -> float | None:
        """Monotonic time at which a realtime stream's next frame is due (None: not paced,
        or waiting for its client, whose next delivery wakes the loop)."""
        if self.session.prefill_pending:
            return 0.0
        if self.config.pace != "realtime" or self.finished or self._waiting_since is not None:
            return None
        due_frame = self.next_frame + 1 - self._lead
        return self.started + due_frame / FRAMES_PER_SECOND

    def push(self, frame: np.ndarray, now: float, codes: np.ndarray | None = None
             ) -> Chunk | None:
        """Adds one frame of audio (and the context's codes through the frame it was
        decoded from, `Frame.heard`); returns the chunk it completed, if any. Bars it
        completes wait for `take_cut` instead."""
        if codes is not None:
            self._heard.append(codes if codes.ndim == 2 else codes[None])
        self.frames_out += 1
        if self.config.pace == "realtime":
            lateness = (now - self.started) * FRAMES_PER_SECOND - self.frames_out
            self.behind_frames = max(0, int(lateness))
        self._recent.append(frame)
        if self._chunk_started_at is None:
            self._chunk_started_at = now
        if self.chunker is not None:
            self._push_bars(frame, now)
            return None
        chunk = self._push_frame(frame)
        if chunk is not None:
            self._completed(chunk, self._chunk_started_at, now)
            self._chunk_started_at = None
        return chunk

    def _push_frame(self, frame: np.ndarray) -> Chunk | None:
        self._frames.append(frame)
        if len(self._frames) < self.config.chunk_frames and not self.finished:
            return None
        audio = np.concatenate(self._frames)
        first = self.frames_out - len(self._frames)
        self._frames = []
        chunk = Chunk(self.next_chunk_index, audio, first, time.time(),
                      **self._take_heard())
        self.next_chunk_index += 1
        self.backlog.append(chunk)
        return chunk

    def _completed(self, chunk: Chunk, started_at: float, now: float) -> None:
        self.last_chunk_latency = now - started_at
        self.last_chunk_late = False
        if self.config.pace != "realtime":
            return
        if self._first_chunk is None:
            self._first_chunk = (now, chunk.first_frame)
            return
        ready_at, first_frame = self._first_chunk
        if now > ready_at + (chunk.first_frame - first_frame) / FRAMES_PER_SECOND:
            self.last_chunk_late = True
            self.underruns += 1

    def _take_heard(self) -> dict:
        """What a move continues a chunk from: its `codes`, `codes_from` and
        `codes_forced` (the codes pushed since the last chunk; an empty array if its
        frames came without theirs) and the session's `style_ramp` (ahead of the chunk's
        last frame by the frames in flight and the decoder's delay: a few of a glide's
        hundreds)."""
        heard, self._heard = self._heard, []
        ramp = self.session.style_ramp()
        if not heard:
            return {"codes": np.zeros((0, CODE_LEVELS), np.int32),
                    "codes_from": self.frames_out, "style_ramp": ramp}
        forced, row = [], 0
        for codes in heard:
            forced.extend(range(row, row + len(codes) - 1))
            row += len(codes)
        return {"codes": np.concatenate(heard), "codes_from": self.frames_out - len(heard),
                "codes_forced": tuple(forced), "style_ramp": ramp}

    def _push_bars(self, frame: np.ndarray, now: float) -> None:
        for cut in self.chunker.feed(frame):
            self._cut_codes.append(self._take_heard())  # joins its chunk in `land`
            self._cuts.append((cut, self._chunk_started_at or now))
            self.unfinished += 1
            self._chunk_started_at = None

    def take_cut(self) -> tuple[BarCut, float] | None:
        """The oldest bars cut and not yet taken, for `finish` (off the step loop)."""
        return self._cuts.popleft() if self._cuts else None

    def finish(self, cut: BarCut) -> Chunk:
        """The cut's bars loudness-matched, as a chunk still without its index (`land`
        gives it one). Call in the order the cuts were taken."""
        bars = self.chunker.finish(cut)
        first = self.chunker.clock.first_frame(bars.first_bar)
        extra = {"bar_mode": True, "first_bar": bars.first_bar, "bars": bars.bars,
                 "bpm": self.chunker.clock.bpm,
                 "beats_per_bar": self.chunker.clock.beats_per_bar}
        if bars.loudness is not None:
            extra["loudness"] = bars.loudness
        return Chunk(-1, bars.audio, first, time.time(), bars.rate, extra)

    def land(self, chunk: Chunk, started_at: float, now: float) -> None:
        """A finished bar chunk joins the backlog; it counts as late if it lands later
        than real time needs it, however long its finishing took."""
        chunk.index = self.next_chunk_index
        for field, value in self._cut_codes.popleft().items():  # `_take_heard`'s
            setattr(chunk, field, value)
        self.next_chunk_index += 1
        self.unfinished -= 1
        self.backlog.append(chunk)
        self._completed(chunk, started_at, now)

    def _chunk_at(self, frame: int) -> int:
        """The chunk in which frame number `frame` starts."""
        if self.chunker is not None:
            return self.chunker.chunk_of_sample(frame * FRAME_SAMPLES)
        return frame // self.config.chunk_frames

    @property
    def at_chunk_boundary(self) -> bool:
        """The frames sampled so far end a chunk (bar mode: the last one holds its
        end) and none is on its way: a loop prefilled now opens the next chunk. Its
        audio is still owed, and comes with the first forced step."""
        n = self.session.frames_generated
        return not self.sampled_in_flight and (n == 0 or self._chunk_at(n - 1) < self._chunk_at(n))

    def reseed(self, codes: np.ndarray, from_chunk: int | None = None) -> int:
        """Replaces the context with `codes` where chunk `from_chunk` starts (default:
        the next chunk that can still open with them); returns that chunk. A second
        reseed before the first applies replaces it."""
        self.pending_context = codes
        self.pending_from_chunk = self.reseed_chunk() if from_chunk is None else from_chunk
        self.reseed_at_boundary()
        return self.pending_from_chunk

    @property
    def _reseed_is_next(self) -> bool:
        """A reseed waits for the chunk that the next frame to sample opens."""
        return (self.pending_context is not None
                and self._chunk_at(self.next_frame) >= self.pending_from_chunk)

    def reseed_at_boundary(self) -> None:
        """Puts a waiting reseed's loop in once the frames sampled end the chunk before
        its own: when the reseed is asked for, and after each frame sampled until then."""
        if self._reseed_is_next and self.at_chunk_boundary:
            self.session.prefill(self.pending_context)
            self.pending_context = None

    def reseed_chunk(self) -> int:
        """The chunk a reseed asked for now opens: the first whose boundary is reached
        with no frame dispatched past it. Frames already on their way cannot be
        recalled (the pipelined loop may have sent one past a boundary)."""
        n = self.next_frame
        return self._chunk_at(n - 1) + 1 if n else 0

    def recent_audio(self, seconds: float) -> np.ndarray:
        frames = list(self._recent)[-max(1, round(seconds * FRAMES_PER_SECOND)):]
        if not frames:
            return np.zeros((0, CHANNELS), np.int16)
        return np.concatenate(frames)

    # -- client side --------------------------------------------------------
    def take_next(self) -> Chunk | None:
        for chunk in self.backlog:
            if chunk.index > self.delivered:
                self.delivered = chunk.index
                return chunk
        return None

    def consume(self, index: int) -> None:
        if index < 0:
            raise ValueError(f"chunk_index: chunk indices start at 0, got {index}")
        if index >= self.next_chunk_index:
            raise ValueError(
                f"chunk_index: {index} has not been generated yet "
                f"(next is {self.next_chunk_index})"
            )
        self.consumed = max(self.consumed, index)
        self.delivered = max(self.delivered, index)
        while self.backlog and self.backlog[0].index <= index:
            self.backlog.popleft()

    def chunk_of_next_frame(self) -> int:
        """The index of the chunk that the next frame sampled will belong to."""
        return self._chunk_at(self.next_frame)

    def status(self) -> dict:
        return {
            "session_id": self.session.id,
            "pace": self.config.pace,
            "frames_generated": self.session.frames_generated,
            "seconds_generated": self.session.frames_generated / FRAMES_PER_SECOND,
            "chunk_frames": self.config.chunk_frames,
            "chunks_generated": self.next_chunk_index,
            "last_delivered": self.delivered,
            "last_consumed": self.consumed,
            "backlog": len(self.backlog),
            "max_backlog": self.config.max_backlog,
            "dropped_chunks": self.dropped_chunks,
            "waited_on_client_seconds": round(self.waited_on_client_seconds, 3),
            "behind_frames": self.behind_frames,
            "underruns": self.underruns,
            "total_frames": self.config.total_frames,
            "finished": self.finished and not self._frames,
        }
