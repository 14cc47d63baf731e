"""Chunking, pacing and backlog bounds of a jam stream, with a controlled clock."""

from __future__ import annotations

import numpy as np
import pytest

from serve_app.audio.barclock import BarClock
from serve_app.audio.bars import BarChunker
from serve_app.engine import Session
from serve_app.jam import JamStream, StreamConfig


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def frame(value: int) -> np.ndarray:
    return np.full((1920, 2), value, np.int16)


def generate(jam: JamStream, clock: Clock, n: int) -> list:
    chunks = []
    for _ in range(n):
        assert jam.due(clock())
        jam.session.frames_generated += 1  # what the engine's record() does per step
        chunk = jam.push(frame(jam.session.frames_generated), clock())
        if chunk:
            chunks.append(chunk)
    return chunks


def test_frames_become_gapless_chunks_in_order():
    clock = Clock()
    jam = JamStream(Session(None), StreamConfig(chunk_frames=3), clock=clock)
    chunks = generate(jam, clock, 7)
    assert [c.index for c in chunks] == [0, 1]
    assert [c.first_frame for c in chunks] == [0, 3]
    assert chunks[1].audio.shape == (3 * 1920, 2)
    np.testing.assert_array_equal(chunks[1].audio[::1920, 0], [4, 5, 6])
    assert chunks[0].metadata()["crossfade_seconds"] == 0.0


def test_realtime_runs_at_most_lead_frames_ahead_of_the_wall_clock():
    clock = Clock()
    jam = JamStream(Session(None), StreamConfig(chunk_frames=3, pace="realtime",
                                                lead_margin_frames=1, max_backlog=100),
                    clock=clock)
    generate(jam, clock, 4)
    assert not jam.due(clock())
    assert jam.next_due_at() == pytest.approx(100.04)  # one frame past the lead
    clock.t += 0.04
    assert jam.due(clock())
    generate(jam, clock, 1)
    assert not jam.due(clock())
    clock.t += 1.0  # a second later, 25 more frames are due
    generate(jam, clock, 25)
    assert not jam.due(clock())


def test_full_backlog_pauses_until_the_client_reads():
    clock = Clock()
    jam = JamStream(Session(None), StreamConfig(chunk_frames=1, max_backlog=2), clock=clock)
    generate(jam, clock, 2)
    assert not jam.due(clock())  # two unread chunks: pause
    assert jam.take_next().index == 0
    assert jam.due(clock())  # chunk 0 was read: it may be dropped to make room
    generate(jam, clock, 1)
    assert [c.index for c in jam.backlog] == [1, 2] and jam.dropped_chunks == 1
    jam.consume(2)
    assert not jam.backlog and jam.status()["last_consumed"] == 2


def test_consume_of_a_future_or_negative_chunk_is_rejected():
    jam = JamStream(Session(None), StreamConfig(chunk_frames=1))
    with pytest.raises(ValueError, match="chunk_index: 3 has not been generated yet"):
        jam.consume(3)
    with pytest.raises(ValueError, match="chunk_index: chunk indices start at 0, got -1"):
        jam.consume(-1)


def test_fixed_length_stream_finishes_with_its_last_partial_chunk():
    clock = Clock()
    jam = JamStream(Session(None), StreamConfig(chunk_frames=4, total_frames=6), clock=clock)
    chunks = generate(jam, clock, 6)
    assert [c.audio.shape[0] for c in chunks] == [4 * 1920, 2 * 1920]
    assert jam.finished and not jam.due(clock()) and jam.status()["finished"]


@pytest.mark.parametrize(
    ("bad", "field"),
    [(dict(pace="warp"), "pace:"), (dict(chunk_frames=0), "chunk_seconds:"),
     (dict(max_backlog=0), "max_backlog:")],
)
def test_bad_stream_settings_name_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        JamStream(Session(None), StreamConfig(**bad))


def test_realtime_chunks_finished_after_the_client_needs_them_are_underruns():
    clock = Clock()
    jam = JamStream(Session(None), StreamConfig(chunk_frames=2, pace="realtime"), clock=clock)
    generate(jam, clock, 2)  # chunk 0: the client starts playing now (t = 100)
    clock.t += 0.05
    generate(jam, clock, 2)  # chunk 1 plays from 100.08: ready at 100.05, in time
    assert jam.underruns == 0 and jam.last_chunk_latency == 0.0
    clock.t += 0.2
    for _ in range(2):  # chunk 2 plays from 100.16 and is ready at 100.25 or later
        clock.t += 0.01
        generate(jam, clock, 1)
    assert jam.underruns == 1 and jam.status()["underruns"] == 1
    assert jam.last_chunk_latency == pytest.approx(0.01)


def test_a_realtime_client_that_stops_taking_chunks_stops_its_clock_not_the_loop():
    """The backlog full of chunks the client has not taken: generation waits for it, no
    wake-up is asked for meanwhile, and when the client takes them again its stream goes
    on from where the client left off: the same lead, no burst, and no chunk counted as
    the server's underrun for the time the client was away."""
    clock = Clock()
    config = StreamConfig(chunk_frames=2, pace="realtime", lead_margin_frames=1,
                          max_backlog=2)
    jam = JamStream(Session(None), config, clock=clock)
    generate(jam, clock, 2)  # chunk 0: the client starts playing (t = 100)
    clock.t += 0.08
    generate(jam, clock, 2)  # chunk 1, in time; the client takes neither
    assert not jam.due(clock()) and jam.next_due_at() is None  # waits, wakes nothing
    clock.t += 5.0
    assert not jam.due(clock()) and jam.next_due_at() is None
    assert [jam.take_next().index for _ in range(2)] == [0, 1]
    generate(jam, clock, 1)  # room again: the frame that was due when the client left
    assert jam.status()["waited_on_client_seconds"] == pytest.approx(5.0)
    assert not jam.due(clock())  # then paced at the lead it had, not a 5 s burst
    assert jam.next_due_at() == pytest.approx(clock() + 0.04)
    clock.t += 0.04
    generate(jam, clock, 1)  # chunk 2, needed 0.16 s after the client's playback resumed
    assert jam.next_chunk_index == 3 and jam.underruns == 0


def test_frames_in_flight_count_for_pacing_length_and_backlog():
    clock = Clock()
    jam = JamStream(Session(None), StreamConfig(chunk_frames=2, max_backlog=1,
                                                total_frames=4), clock=clock)
    generate(jam, clock, 1)
    jam.step_dispatched(forced=False)  # the second frame of chunk 0 is on the device
    assert not jam.due(clock())  # it will fill the backlog of 1: pause until delivered
    jam.step_landed(forced=False)
    generate(jam, clock, 1)
    jam.take_next()
    generate(jam, clock, 1)
    jam.step_dispatched(forced=False)  # frame 4 of 4 in flight: the render ends once it lands
    assert not jam.due(clock())


def bar_jam(clock: Clock, **config) -> JamStream:
    """A bar-mode stream of 0.2 s bars (300 bpm, one beat a bar): 5 frames a chunk."""
    chunker = BarChunker(BarClock(300.0, 1), bars_per_chunk=1)
    return JamStream(Session(None), StreamConfig(chunk_frames=5, **config), clock=clock,
                     chunker=chunker)


def test_bar_chunks_are_cut_on_the_step_and_land_once_finished():
    clock = Clock()
    jam = bar_jam(clock, pace="realtime", max_backlog=8)
    assert generate(jam, clock, 5) == []  # the frame that ends a bar only cuts it
    assert jam.unfinished == 1 and not jam.backlog and jam.take_next() is None
    cut, started_at = jam.take_cut()
    assert jam.take_cut() is None and jam.unfinished == 1  # taken, not landed yet
    chunk = jam.finish(cut)
    clock.t += 0.3  # finishing took long; real time had not needed chunk 0 yet
    jam.land(chunk, started_at, clock())
    assert jam.take_next() is chunk and chunk.index == 0 and jam.unfinished == 0
    assert chunk.audio.shape == (9600, 2) and chunk.metadata()["first_bar"] == 0
    assert jam.last_chunk_latency == pytest.approx(0.3) and jam.underruns == 0
    assert not jam.last_chunk_late
    generate(jam, clock, 5)  # chunk 1 plays from t + 0.2; it lands 0.3 s after that
    taken = jam.take_cut()
    clock.t += 0.5
    jam.land(jam.finish(taken[0]), taken[1], clock())
    assert jam.next_chunk_index == 2 and jam.underruns == 1 and jam.last_chunk_late


def test_bars_still_being_finished_are_the_servers_wait_not_the_clients():
    """A backlog filled only by chunks the server is still making (bars with the finisher
    workers) is no client's doing: the realtime clock runs on, and a chunk that lands
    late because of it is an underrun."""
    clock = Clock()
    jam = bar_jam(clock, pace="realtime", max_backlog=1)
    generate(jam, clock, 5)  # bar 0 cut, with a worker
    cut, started_at = jam.take_cut()
    jam.land(jam.finish(cut), started_at, clock())
    jam.take_next()  # chunk 0 plays from t = 100
    generate(jam, clock, 5)  # bar 1 cut: needed from 100.2
    assert not jam.due(clock()) and jam.next_due_at() is not None
    cut, started_at = jam.take_cut()
    clock.t += 0.5
    assert not jam.due(clock())
    jam.land(jam.finish(cut), started_at, clock())
    assert jam.underruns == 1 and jam.status()["waited_on_client_seconds"] == 0


def test_bars_being_finished_count_against_the_backlog():
    clock = Clock()
    jam = bar_jam(clock, max_backlog=2)
    generate(jam, clock, 10)  # two chunks cut, neither finished: the backlog is full
    assert jam.unfinished == 2 and not jam.due(clock())
    for _ in range(2):
        cut, started_at = jam.take_cut()
        jam.land(jam.finish(cut), started_at, clock())
    assert not jam.due(clock())  # landed and unread: still full
    jam.take_next()
    assert jam.due(clock())
