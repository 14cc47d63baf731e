"""What a WebSocket stream remembers to move to another replica (`serve_app/api/resume.py`):
real jam streams and bar chunkers make the chunks, as the generator does; the move
itself through real Ray Serve is in `test_serve_replicas.py`."""

from __future__ import annotations

import numpy as np
import pytest

from serve_app.api.resume import StreamMemory
from serve_app.audio.barclock import BarClock
from serve_app.audio.bars import BarChunker
from serve_app.engine import Session
from serve_app.engine.session import CODE_LEVELS, Controls
from serve_app.frames import FRAME_SAMPLES
from serve_app.generator import BarSpec, JamSpec, JamUpdate, StyleSpec
from serve_app.jam import JamStream, StreamConfig

# 93.7 bpm, 4 beats: a bar is 122,945.6 samples, so bar lines fall inside frames
CLOCK = BarClock(93.7, 4)


def noise(n_frames: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return list(rng.integers(-20000, 20000, (n_frames, FRAME_SAMPLES, 2), dtype=np.int16))


def codes_of(n: int) -> np.ndarray:
    """A frame's codes, every level `n`: tells frames apart."""
    return np.full(CODE_LEVELS, n, np.int32)


def play(jam: JamStream, memory: StreamMemory, frames: list[np.ndarray], first_code: int
         ) -> list:
    """Pushes frames (with their codes) as the generator does and plays each finished
    chunk through `memory`, as the WebSocket stream does."""
    played = []
    for i, audio in enumerate(frames):
        jam.session.frames_generated += 1
        jam.push(audio, 0.0, codes_of(first_code + i))
        if jam.chunker is not None:
            while (taken := jam.take_cut()) is not None:
                jam.land(jam.finish(taken[0]), taken[1], 0.0)
        while (chunk := jam.take_next()) is not None:
            played.append(memory.played(chunk))
    return played


def test_a_moved_stream_counts_on_and_continues_from_the_codes_heard():
    memory = StreamMemory(JamSpec(StyleSpec(names=["ambient"])))
    first = play(JamStream(Session(None), StreamConfig(chunk_frames=3)), memory,
                 noise(13), first_code=0)
    assert [(c.index, c.first_frame) for c in first] == [(0, 0), (1, 3), (2, 6), (3, 9)]
    assert all(c.codes is None for c in first)  # codes stay on the server

    moved = memory.continuation()
    assert (moved.index, moved.frame, moved.bar) == (4, 12, 0)  # frame 12: not in a chunk yet
    np.testing.assert_array_equal(moved.spec.heard[:, 0], np.arange(12))
    assert moved.spec.heard.shape == (12, CODE_LEVELS) and moved.spec.heard.dtype == np.int32
    memory.moved(moved)

    second = play(JamStream(Session(None), StreamConfig(chunk_frames=3)), memory,
                  noise(6, seed=1), first_code=100)
    assert [(c.index, c.first_frame) for c in second] == [(4, 12), (5, 15)]
    assert memory.session_index(5) == 1 and memory.session_index(3) < 0
    assert memory.client_index(1) == 5 and memory.moves == 1
    again = memory.continuation()  # a second move keeps what the first forced
    assert (again.index, again.frame) == (6, 18)
    np.testing.assert_array_equal(again.spec.heard[:, 0],
                                  np.r_[np.arange(12), np.arange(100, 106)])


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
    chunks = play(JamStream(Session(None), StreamConfig(chunk_frames=1),
                            chunker=spec.bar.chunker(None)), memory, audio[:200], 0)
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
    np.testing.assert_array_equal(moved.spec.heard[:, 0], np.arange(moved.frame))
    memory.moved(moved)

    # The continuation's first frame is the one holding the bar line: fed the same audio
    # from there, its chunker cuts the bars the listener has not heard, from the line on.
    after = play(JamStream(Session(None), StreamConfig(chunk_frames=1),
                           chunker=moved.spec.bar.chunker(None)), memory,
                 audio[moved.frame:], 1000)
    assert after[0].index == len(chunks)
    assert after[0].extra["first_bar"] == bars_played
    assert after[0].first_frame == CLOCK.first_frame(bars_played)
    bar = after[0].audio
    np.testing.assert_array_equal(bar[:-1], stream[line:line + len(bar) - 1])
    assert abs(len(bar) - (CLOCK.boundary(bars_played + bars_per_chunk) - line)) <= 1


def test_skipped_samples_must_lie_within_one_frame():
    with pytest.raises(ValueError, match="skip_samples"):
        BarChunker(CLOCK, 1, skip_samples=FRAME_SAMPLES)
