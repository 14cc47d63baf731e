"""What a WebSocket stream remembers to move to another replica (`serve_app/api/resume.py`):
real jam streams and bar chunkers make the chunks, as the generator does; the move
itself through real Ray Serve is in `test_serve_replicas.py`."""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import pytest

from serve_app.api.resume import StreamMemory
from serve_app.audio.barclock import BarClock
from serve_app.audio.bars import BarChunker
from serve_app.engine import Session
from serve_app.engine.session import CODE_LEVELS, Controls
from serve_app.frames import FRAME_SAMPLES
from serve_app.jam import JamStream, StreamConfig
from serve_app.jam_spec import BarSpec, JamSpec, JamUpdate, StyleSpec
from serve_app.styles import StyleModel

# 93.7 bpm, 4 beats: a bar is 122,945.6 samples, so bar lines fall inside frames
CLOCK = BarClock(93.7, 4)


def noise(n_frames: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return list(rng.integers(-20000, 20000, (n_frames, FRAME_SAMPLES, 2), dtype=np.int16))


def codes_of(n: int) -> np.ndarray:
    """A frame's codes, every level `n`: tells frames apart."""
    return np.full(CODE_LEVELS, n, np.int32)


def codes_from(first: int, n: int) -> np.ndarray:
    return np.stack([codes_of(first + i) for i in range(n)])


class Stream:
    """A real jam stream stepped as the engine and the generator step it: queued loop
    codes forced first, each audio frame's codes sampled, the audio handed out one step
    later (the decoder's delay), a waiting reseed put in at its chunk boundary. Each
    chunk finished is played through `memory`, as the WebSocket stream plays it, unless
    `lost` (made, never sent: its replica died)."""

    def __init__(self, memory: StreamMemory, spec: JamSpec, chunk_frames: int = 3,
                 style: np.ndarray | None = None, style_model: StyleModel | None = None):
        """A session started from `spec`, as `Generator.start` starts one (on `style`,
        its embedding, whose frames' inputs `style_model` makes)."""
        self.memory = memory
        self.style_model = style_model
        session = Session(style)
        if spec.style_ramp is not None:
            session.resume_style_ramp(spec.style_ramp)
        session.attach_decoder(1)
        chunker = spec.bar.chunker(None) if spec.bar is not None else None
        self.jam = JamStream(session, StreamConfig(chunk_frames=chunk_frames,
                                                   max_backlog=64), chunker=chunker)
        if spec.heard is not None:
            session.prefill(spec.heard)
        if spec.reseed is not None:
            self.jam.reseed(spec.reseed, spec.reseed_chunk)
        self._audio: collections.deque[np.ndarray] = collections.deque()

    def play(self, audio: list[np.ndarray], first_code: int, *, lost: bool = False) -> list:
        played = []
        for i, frame in enumerate(audio):
            while self.jam.session.prefill_pending:
                forced = self.jam.session.next_frame_inputs(None).forced
                played += self._step(forced, None, lost)
            if self.style_model is not None:  # a sampled frame's inputs: the glide moves
                self.jam.session.next_frame_inputs(self.style_model)
            played += self._step(codes_of(first_code + i), frame, lost)
            self.jam.reseed_at_boundary()
        return played

    def _step(self, codes: np.ndarray, audio: np.ndarray | None, lost: bool) -> list:
        if audio is not None:
            self._audio.append(audio)
        heard = self.jam.session.record(codes, forced=audio is None)
        if heard is None:
            return []
        self.jam.push(self._audio.popleft(), 0.0, heard)
        while (taken := self.jam.take_cut()) is not None:
            self.jam.land(self.jam.finish(taken[0]), taken[1], 0.0)
        if lost:
            return []
        chunks = []
        while (chunk := self.jam.take_next()) is not None:
            chunks.append(self.memory.played(chunk))
        return chunks


def test_a_moved_stream_counts_on_and_continues_from_the_codes_heard():
    memory = StreamMemory(JamSpec(StyleSpec(names=["ambient"])))
    first = Stream(memory, memory.spec).play(noise(14), first_code=0)  # 13 frames heard
    assert [(c.index, c.first_frame) for c in first] == [(0, 0), (1, 3), (2, 6), (3, 9)]
    assert all(c.codes is None and c.codes_forced == () for c in first)  # server only

    moved = memory.continuation()
    assert (moved.index, moved.frame, moved.bar) == (4, 12, 0)  # frame 12: not in a chunk yet
    np.testing.assert_array_equal(moved.spec.heard, codes_from(0, 12))
    assert moved.spec.heard.dtype == np.int32 and moved.spec.reseed is None
    memory.moved(moved)

    again = memory.continuation()  # moved again before a chunk came: the same context
    np.testing.assert_array_equal(again.spec.heard, moved.spec.heard)
    assert (again.index, again.frame) == (4, 12)

    second = Stream(memory, moved.spec).play(noise(7, seed=1), first_code=100)
    assert [(c.index, c.first_frame) for c in second] == [(4, 12), (5, 15)]
    assert memory.session_index(5) == 1 and memory.session_index(3) < 0
    assert memory.client_index(1) == 5 and memory.moves == 1
    again = memory.continuation()  # a second move keeps what the first forced
    assert (again.index, again.frame) == (6, 18)
    np.testing.assert_array_equal(again.spec.heard,
                                  np.r_[codes_from(0, 12), codes_from(100, 6)])


def test_a_moved_loop_jam_keeps_its_loop_in_the_context():
    """A loop's codes go into the state forced, never heard as themselves: a move soon
    after the start must force them again, not only the few frames heard since."""
    loop = codes_from(500, 8)
    memory = StreamMemory(JamSpec(StyleSpec()))
    Stream(memory, dataclasses.replace(memory.spec, heard=loop)).play(noise(7), 0)
    np.testing.assert_array_equal(memory.continuation().spec.heard,
                                  np.r_[loop, codes_from(0, 6)])


def test_an_applied_reseed_is_the_context_a_move_continues_from():
    memory = StreamMemory(JamSpec(StyleSpec()))
    stream = Stream(memory, memory.spec)
    stream.play(noise(5), 0)  # chunk 0 played; frames 3 and 4 sampled
    new_loop = codes_from(700, 4)
    applies = stream.jam.reseed(new_loop)
    assert applies == 2  # frame 5 was sampled already: chunk 1 stays the old loop's
    memory.reseeded(new_loop, applies)
    played = stream.play(noise(6, seed=1), 100)  # chunks 1 and 2
    assert [c.index for c in played] == [1, 2]
    moved = memory.continuation()
    assert moved.spec.reseed is None  # applied: in the context, not waiting any more
    np.testing.assert_array_equal(moved.spec.heard, np.r_[
        codes_from(0, 5), codes_of(100)[None], new_loop, codes_from(101, 3)])


def test_a_reseed_waiting_for_the_next_chunk_opens_the_moved_sessions_first():
    memory = StreamMemory(JamSpec(StyleSpec()))
    stream = Stream(memory, memory.spec)
    stream.play(noise(5), 0)
    memory.reseeded(codes_from(700, 4), stream.jam.reseed(codes_from(700, 4)))  # chunk 2
    stream.play(noise(2, seed=1), 100)  # chunk 1 played; the reseed waits for its boundary
    moved = memory.continuation()
    assert moved.index == 2 and moved.spec.reseed is None
    np.testing.assert_array_equal(moved.spec.heard, np.r_[
        codes_from(0, 5), codes_of(100)[None], codes_from(700, 4)])


def test_a_reseed_for_a_chunk_lost_with_its_replica_opens_that_chunk_after_the_move():
    """The generator ran ahead: chunk 1 was made but died with the replica, and the
    reseed opens chunk 2. The new session replays chunk 1 and opens chunk 2 with it."""
    memory = StreamMemory(JamSpec(StyleSpec()))
    stream = Stream(memory, memory.spec)
    stream.play(noise(4), 0)  # chunk 0 played
    stream.play(noise(2, seed=1), 100, lost=True)  # frames 4 and 5 sampled
    new_loop = codes_from(700, 4)
    memory.reseeded(new_loop, stream.jam.reseed(new_loop))  # chunk 2, forced at once
    stream.play(noise(1, seed=3), 300, lost=True)  # its first step hands out chunk 1's end
    assert stream.jam.next_chunk_index == 2  # chunk 1 made, never sent
    moved = memory.continuation()
    assert moved.index == 1 and moved.spec.reseed_chunk == 1
    np.testing.assert_array_equal(moved.spec.reseed, new_loop)
    np.testing.assert_array_equal(moved.spec.heard, codes_from(0, 3))
    memory.moved(moved)

    after = Stream(memory, moved.spec).play(noise(8, seed=2), 200)
    assert [c.index for c in after] == [1, 2]
    again = memory.continuation()
    assert again.spec.reseed is None
    np.testing.assert_array_equal(again.spec.heard, np.r_[
        codes_from(0, 3), codes_from(200, 3), new_loop, codes_from(203, 3)])


def test_a_moved_stream_starts_as_its_updates_left_it():
    jazz = StyleSpec(names=["jazz"], embeddings=[np.ones(4, np.float32)], weights=[1.0])
    memory = StreamMemory(JamSpec(StyleSpec(names=["ambient"]), Controls(), notes=[60]))
    memory.update(JamUpdate(style=jazz, style_ramp_seconds=8.0,
                            controls={"temperature": 0.7, "cfg": {"musiccoca": 2.5}}))
    memory.update(JamUpdate(style=StyleSpec(), controls={"top_k": 9}))  # style left as it is
    spec = memory.continuation().spec
    assert spec.style is jazz and spec.notes == [60]  # a ramp's end: its target
    assert (spec.controls.temperature, spec.controls.top_k) == (0.7, 9)
    assert spec.controls.cfg["musiccoca"] == 2.5
    assert spec.controls.cfg == {**Controls().cfg, "musiccoca": 2.5}  # other scales kept
    assert memory.continuation().spec.heard is None  # nothing heard yet: no context


@pytest.mark.parametrize("bars_per_chunk", [1, 2])
def test_a_moved_bar_stream_restarts_on_its_bar_line_without_repeating_a_sample(
        bars_per_chunk):
    spec = JamSpec(StyleSpec(), bar=BarSpec(CLOCK, bars_per_chunk, loudness_mode="none"))
    audio = noise(400)
    memory = StreamMemory(spec)
    chunks = Stream(memory, spec, chunk_frames=1).play(audio[:201], 0)  # 200 heard
    stream = np.concatenate(audio)
    bars_played = len(chunks) * bars_per_chunk
    assert [c.extra["first_bar"] for c in chunks] == list(range(0, bars_played,
                                                                bars_per_chunk))

    moved = memory.continuation()
    line = CLOCK.boundary(bars_played)
    assert line % FRAME_SAMPLES  # the bar line falls inside a frame here
    assert (moved.bar, moved.frame) == (bars_played, line // FRAME_SAMPLES)
    assert moved.spec.bar.skip_samples == line % FRAME_SAMPLES
    # the context is every whole frame before the line, none after it
    np.testing.assert_array_equal(moved.spec.heard, codes_from(0, moved.frame))
    memory.moved(moved)

    # The continuation's first frame is the one holding the bar line: fed the same audio
    # from there, its chunker cuts the bars the listener has not heard, from the line on.
    after = Stream(memory, moved.spec, chunk_frames=1).play(audio[moved.frame:], 1000)
    assert after[0].index == len(chunks)
    assert after[0].extra["first_bar"] == bars_played
    assert after[0].first_frame == CLOCK.first_frame(bars_played)
    bar = after[0].audio
    np.testing.assert_array_equal(bar[:-1], stream[line:line + len(bar) - 1])
    assert abs(len(bar) - (CLOCK.boundary(bars_played + bars_per_chunk) - line)) <= 1


def test_skipped_samples_must_lie_within_one_frame():
    with pytest.raises(ValueError, match="skip_samples"):
        BarChunker(CLOCK, 1, skip_samples=FRAME_SAMPLES)


def test_a_style_glide_under_way_goes_on_after_a_move():
    """Chunks carry the session's glide (server side only); a continuation starts its
    session there, so it goes on from the same point towards the same style instead of
    jumping to it. A newer style update, or the end of the glide, leaves nothing to carry."""
    model = StyleModel.mock()
    ambient, techno = model.embed_text("ambient"), model.embed_text("techno")
    memory = StreamMemory(JamSpec(StyleSpec(names=["ambient"])))
    stream = Stream(memory, memory.spec, style=ambient, style_model=model)
    to_techno = StyleSpec(names=["techno"], embeddings=[techno], weights=[1.0])
    memory.update(JamUpdate(style=to_techno, style_ramp_seconds=1.0))
    stream.jam.session.set_style(techno, ramp_seconds=1.0)  # 25 frames, as the generator
    played = stream.play(noise(10), 0)  # 9 frames heard: chunks 0-2; 10 frames' inputs
    assert len(played) == 3 and all(c.style_ramp is None for c in played)  # server only
    glide = memory.continuation().spec.style_ramp
    assert (glide.frames, glide.done) == (25, 10)
    np.testing.assert_array_equal(glide.start, ambient)

    moved = Stream(StreamMemory(memory.spec), memory.continuation().spec, style=techno,
                   style_model=model)
    goes_on = [moved.jam.session.next_frame_inputs(model).block for _ in range(20)]
    for block in goes_on:
        np.testing.assert_array_equal(block, stream.jam.session.next_frame_inputs(model).block)
    plain = Session(techno)  # how a moved session started before: at the target
    assert not np.array_equal(goes_on[0], plain.next_frame_inputs(model).block)

    memory.update(JamUpdate(style=StyleSpec(names=["jazz"], embeddings=[ambient],
                                            weights=[1.0]), style_ramp_seconds=4.0))
    assert memory.continuation().spec.style_ramp is None  # its glide: the next chunk says
    stream.play(noise(30, seed=2), 100)  # the glide to techno ends (25 frames)
    assert memory.continuation().spec.style_ramp is None
