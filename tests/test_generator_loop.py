"""The generator's step loop in-process, on the real tiny model.

What the loop reports about its own speed (`mean_step_ms` in /health, the
`mrt_step_ms` metric, the message a session that fell behind gets) is what an
operator sizes replicas by, so it has to be the steps' own time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import resource
import time

import numpy as np
import pytest

from serve_app.audio.barclock import BarClock
from serve_app.errors import BadRequest, OverCapacity, Unavailable, UnknownSession
from serve_app.generator import GeneratorCore
from serve_app.jam import StreamConfig
from serve_app.jam_spec import JamSpec, JamUpdate, StyleSpec

from .generator_cores import wait_for_boot, wait_until_ready
from .offline_decode import assert_heard_as_decoded, decode_at_once


@pytest.fixture(scope="module")
def core(tiny):
    core = GeneratorCore("tiny", loaded=tiny, max_sessions=1, buckets=(1,))
    wait_until_ready(core)
    yield core
    core.shutdown()


def test_step_times_add_up_to_no_more_than_the_time_the_steps_took(core):
    """An asap render keeps the pipelined loop busy: each step is dispatched while the
    one before it runs. Steps on one device run one after another, so their times
    cannot add up to more than the render took; counted from dispatch, each would
    also hold its predecessor's time, about twice the render in all."""
    frames = 60

    async def render() -> float:
        spec = JamSpec(style=StyleSpec(), seed=1, stream=StreamConfig(
            chunk_frames=10, pace="asap", total_frames=frames))
        began = time.perf_counter()
        sid = (await core.start(spec))["session_id"]
        for _ in range(frames // 10):
            assert await core.next_chunk(sid, timeout=60) is not None
        took = time.perf_counter() - began
        await core.stop(sid)
        return took

    steps, step_seconds = core.steps, core.step_seconds
    took = asyncio.run(render())
    assert core.steps - steps == frames + core.engine.model.decoder_delay_frames
    assert 0 < core.step_seconds - step_seconds <= took


def test_replies_to_waiting_realtime_clients_go_out_before_the_next_step(core):
    """On a CPU host the next step would take the cores that a finished chunk's reply
    needs: a step that completes a chunk a realtime client waits for holds the next one
    until the chunk is taken (bounded), and says so in `mrt_reply_hold_ms`. An asap
    render's next step is its next chunk, so nothing holds it."""
    def holds() -> int:
        return core.metrics.snapshot()["mrt_reply_hold_ms_le"]["+Inf"]

    async def stream(pace: str) -> None:
        spec = JamSpec(style=StyleSpec(), seed=1, stream=StreamConfig(
            chunk_frames=5, pace=pace, total_frames=40))
        sid = (await core.start(spec))["session_id"]
        for _ in range(8):
            assert await core.next_chunk(sid, timeout=60) is not None
        await core.stop(sid)

    before = holds()
    asyncio.run(stream("asap"))
    assert holds() == before
    asyncio.run(stream("realtime"))
    # the first chunks come out of the lead, maybe before the client waits; the rest
    # are completed with the client waiting
    assert holds() - before >= 4


def test_stop_all_ends_polled_jams_and_leaves_the_others(core):
    """/jam/stop_all is for jams no connection holds; a WebSocket jam or a render ends
    with its own request."""
    async def stop_all_twice() -> None:
        spec = JamSpec(style=StyleSpec(), seed=1, stream=StreamConfig(chunk_frames=10))
        held = (await core.start(spec))["session_id"]
        assert (await core.stop_all())["stopped"] == 0
        await core.stop(held)
        spec.polled = True
        polled = (await core.start(spec))["session_id"]
        assert await core.stop_all() == {"stopped": 1, "replica": core.replica_tag}
        with pytest.raises(UnknownSession, match="stopped by /jam/stop_all"):
            await core.status(polled)

    asyncio.run(stop_all_twice())


def test_a_chunk_stream_takes_no_more_than_its_credit_and_ends_with_its_session(core):
    """A WebSocket stream gets its chunks over one call (`chunks`). A transport buffers
    what such a stream sends, so the stream takes chunks from the backlog only as far
    as its credit goes: a client that stops reading still pauses generation."""
    spec = JamSpec(style=StyleSpec(), seed=1,
                   stream=StreamConfig(chunk_frames=2, pace="asap", max_backlog=2))

    async def scenario() -> None:
        sid = (await core.start(spec))["session_id"]
        stream = core.chunks(sid, credit=2)
        assert [(await anext(stream)).index for _ in range(2)] == [0, 1]
        third = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(1.0)  # asap, 2-frame chunks: unbounded, ~100 chunks by now
        assert not third.done()
        assert (await core.status(sid))["chunks_generated"] <= 2 + 2  # sent + backlog
        assert (await core.grant(sid, 1))["credit"] == 1
        assert (await asyncio.wait_for(third, 30)).index == 2
        # out of credit again: a stop still ends the stream at once, quietly
        rest = asyncio.ensure_future(anext(stream, None))
        await asyncio.sleep(0.2)
        await core.stop(sid)
        assert await asyncio.wait_for(rest, 2) is None

        # a session that ended for a reason says why, as next_chunk does
        sid = (await core.start(spec))["session_id"]
        stream = core.chunks(sid, credit=1)
        await anext(stream)
        assert core.expire_idle(time.monotonic() + core.idle_seconds + 1) == [sid]
        with pytest.raises(UnknownSession, match="expired"):
            await anext(stream)
        with pytest.raises(UnknownSession, match="expired"):
            await core.grant(sid, 1)
        with pytest.raises(BadRequest, match="credit: must be at least 1"):
            await anext(core.chunks(sid, credit=0))

    asyncio.run(scenario())


def test_a_realtime_client_that_stops_reading_leaves_the_loop_idle(core):
    """A realtime stream whose backlog its client left full waits without the step loop
    spinning for it (it used to poll without pause, a whole core while the client was
    away), and counts the wait as the client's, not as an underrun."""
    def cpu_seconds() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    spec = JamSpec(style=StyleSpec(), seed=1,
                   stream=StreamConfig(chunk_frames=2, pace="realtime", max_backlog=2))

    async def scenario() -> None:
        sid = (await core.start(spec))["session_id"]
        while (await core.status(sid))["backlog"] < 2:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        began, used = time.monotonic(), cpu_seconds()
        await asyncio.sleep(1.5)
        busy = (cpu_seconds() - used) / (time.monotonic() - began)
        assert busy < 0.3, f"the process used {busy:.2f} CPU-s a second while idle"
        for index in range(3):  # the client comes back: the stream goes on
            assert (await core.next_chunk(sid, 30)).index == index
        status = await core.status(sid)
        assert status["waited_on_client_seconds"] >= 1.5 and status["underruns"] == 0
        await core.stop(sid)

    asyncio.run(scenario())


def test_a_session_the_server_falls_behind_on_is_reported_not_silent(core, caplog):
    """The loop stalls for 1.5 s with a realtime client reading (its lock held, as a
    step or a compile far over its time would hold it; the lead is 0.28 s): the chunks
    after it are late, and that shows in the session's status, in `mrt_underruns` and
    in one warning line naming the session: at once, or (a second session soon after) in
    the summary the loop writes when 10 s have passed. None of it hangs on how fast the
    steps are."""
    spec = JamSpec(style=StyleSpec(), seed=1,
                   stream=StreamConfig(chunk_frames=2, pace="realtime"))

    def underruns() -> float:
        return core.metrics.snapshot()["mrt_underruns"]

    def lines_naming(sid: str) -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "serve_app.generator"
                and "fell behind real time" in r.getMessage() and sid in r.getMessage()]

    async def fall_behind() -> None:
        before = underruns()  # this core serves one session at a time
        sid = (await core.start(spec))["session_id"]
        for index in range(3):
            assert (await core.next_chunk(sid, 30)).index == index
        with core._lock:  # the stall itself; nothing of the core is replaced
            time.sleep(1.5)
        for index in range(3, 8):
            assert (await core.next_chunk(sid, 30)).index == index
        status = await core.status(sid)
        await core.stop(sid)
        assert status["underruns"] >= 1 and underruns() - before == status["underruns"]
        assert status["message"].startswith("this session fell behind real time")
        # at once, or in the generator's next summary if a line went out in the last 10 s
        deadline = time.monotonic() + 15
        while not lines_naming(sid) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert len(lines_naming(sid)) == 1, caplog.text

    async def twice() -> None:  # the second in the summary the loop writes 10 s later
        await fall_behind()
        await fall_behind()

    with caplog.at_level(logging.WARNING, logger="serve_app.generator"):
        asyncio.run(twice())


def test_a_reseed_starts_the_new_loop_exactly_at_its_chunk(core, tiny):
    """A reseed waits for the chunk boundary; the new loop's continuation must open the
    chunk it applies from. The decoder's delay makes that the step after the boundary's
    codes, whose audio still belongs to the chunk before. Checked against the codes the
    session holds: its context ends with the new loop and the frames sampled after it."""
    chunk = 10
    spec = JamSpec(style=StyleSpec(), seed=2, stream=StreamConfig(
        chunk_frames=chunk, pace="asap", max_backlog=1))
    loop = np.random.default_rng(2).uniform(-0.3, 0.3, (2 * 48000, 2)).astype(np.float32)

    async def scenario() -> tuple[np.ndarray, np.ndarray]:
        sid = (await core.start(spec))["session_id"]
        try:
            assert (await core.next_chunk(sid, timeout=60)).index == 0
            applies = (await core.reseed(sid, loop))["applies_from_chunk"]
            for index in range(1, applies):
                assert (await core.next_chunk(sid, timeout=60)).index == index
            # the backlog holds one chunk: with `applies` made and not taken, it pauses
            deadline = time.monotonic() + 60
            while (await core.status(sid))["chunks_generated"] <= applies:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            context = np.stack(core._jams[sid].session.context)
            return (await core.next_chunk(sid, timeout=60)).audio, context
        finally:
            await core.stop(sid)

    audio, context = asyncio.run(scenario())
    # context: ...the new loop, `chunk` frames sampled after it, and one more (the step
    # that handed out the last one's audio)
    new_loop = core.encoder.codes(loop, BarClock(120.0))
    before = len(context) - chunk - 1
    np.testing.assert_array_equal(context[:before], new_loop[-before:])
    decoded = decode_at_once(tiny, context)[-chunk:]
    assert_heard_as_decoded(audio.reshape(chunk, -1, 2), decoded)


def test_a_moved_streams_context_and_waiting_reseed_go_in_where_they_belong(core):
    """A moved stream's continuation (`JamSpec.heard`, `reseed`, `reseed_chunk`) on the
    real engine: the context forced at the start comes back with chunk 0's codes, the
    reseed with the codes of the chunk it opens, each forced row marked so, then the
    frames heard after it; and the chunks' codes in order are the state's own context.
    This is what `StreamMemory` continues a later move from."""
    chunk = 5
    rng = np.random.default_rng(3)
    heard = core.encoder.codes(rng.uniform(-0.3, 0.3, (48000, 2)).astype(np.float32),
                               BarClock(120.0))[-8:]
    reseed = core.encoder.codes(rng.uniform(-0.3, 0.3, (48000, 2)).astype(np.float32),
                                BarClock(120.0))[-6:]
    spec = JamSpec(style=StyleSpec(), seed=4, heard=heard, reseed=reseed, reseed_chunk=2,
                   stream=StreamConfig(chunk_frames=chunk, pace="asap", max_backlog=8))

    async def scenario() -> list:
        sid = (await core.start(spec))["session_id"]
        try:
            return [await core.next_chunk(sid, timeout=60) for _ in range(3)]
        finally:
            await core.stop(sid)

    chunks = asyncio.run(scenario())
    assert [c.index for c in chunks] == [0, 1, 2]
    # the forced rows first, then the chunk's own frames
    assert [c.codes_forced for c in chunks] == [tuple(range(8)), (), tuple(range(6))]
    assert [(len(c.codes), c.codes_from) for c in chunks] == [(13, 0), (5, 5), (11, 10)]
    np.testing.assert_array_equal(chunks[0].codes[:8], heard)
    np.testing.assert_array_equal(chunks[2].codes[:6], reseed)
    # and they are the state's whole context: chunk 2's audio is its frames decoded
    # after everything the chunks' codes hold, in that order (the last frame's audio
    # looks ahead into codes that came after)
    decoded = decode_at_once(core.loaded, np.concatenate([c.codes for c in chunks]))
    assert_heard_as_decoded(chunks[2].audio.reshape(chunk, -1, 2)[:-1],
                            decoded[-(chunk - 1):])


def test_a_glide_under_way_rides_on_the_chunks_and_a_continuation_goes_on_with_it(core,
                                                                                 tiny):
    """On the real loop: after a style update with a ramp, the chunks carry the glide
    (where it started, its length, the frames done) for the ingress; a session started
    from a continuation holding it is at the same point of the same glide."""
    def style(name: str) -> StyleSpec:
        return StyleSpec(names=[name], embeddings=[tiny.style.embed_text(name)], weights=[1.0])

    spec = JamSpec(style=style("ambient"), seed=5,
                   stream=StreamConfig(chunk_frames=4, pace="asap", max_backlog=8))

    async def scenario():
        sid = (await core.start(spec))["session_id"]
        try:
            first = await core.next_chunk(sid, timeout=60)
            await core.update(sid, JamUpdate(style=style("techno"), style_ramp_seconds=2.0))
            chunks = [await core.next_chunk(sid, timeout=60) for _ in range(4)]
        finally:
            await core.stop(sid)
        moved = dataclasses.replace(spec, style=style("techno"), style_ramp=chunks[-1].style_ramp)
        sid = (await core.start(moved))["session_id"]
        try:
            resumed = core._jams[sid].session.style_ramp()
        finally:
            await core.stop(sid)
        return first, chunks[-1].style_ramp, resumed

    first, glide, resumed = asyncio.run(scenario())
    assert first.style_ramp is None  # no glide before the update
    assert glide is not None and glide.frames == 50 and 0 < glide.done < 50, glide
    assert resumed.frames == 50 and resumed.done >= glide.done  # it may have stepped since
    np.testing.assert_array_equal(resumed.start, glide.start)


def test_an_update_takes_effect_from_the_frame_it_names(core):
    """An asap stream keeps a step on the device nearly all the time; its controls were
    read at dispatch, so an update lands after it. The frame the update names is the
    first sampled differently, against the same seed left alone."""
    frames = 20  # with the decoder's delay, 21 codes: the session's context keeps them all

    async def codes(update_after_first_chunk: bool) -> tuple[np.ndarray, int | None]:
        spec = JamSpec(style=StyleSpec(), seed=3, stream=StreamConfig(
            chunk_frames=2, pace="asap", total_frames=frames))
        sid = (await core.start(spec))["session_id"]
        try:
            assert await core.next_chunk(sid, timeout=60) is not None
            applies = None
            if update_after_first_chunk:
                reply = await core.update(sid, JamUpdate(controls={"temperature": 0.05}))
                applies = reply["applies_from_frame"]
            deadline = time.monotonic() + 60
            while not (await core.status(sid))["finished"]:
                assert time.monotonic() < deadline
                await core.next_chunk(sid, timeout=5)
            return np.stack(core._jams[sid].session.context), applies
        finally:
            await core.stop(sid)

    plain, _ = asyncio.run(codes(False))
    updated, applies = asyncio.run(codes(True))
    assert applies < frames, "the stream ended before the update: nothing to compare"
    differs = np.flatnonzero((plain != updated).any(axis=1))
    assert differs.size and differs[0] == applies, (differs[:3], applies)


def test_a_refused_start_names_the_replica_that_refused(core, tmp_path):
    """The ingress tries a start refused for capacity or readiness on another replica
    (deployments/ingress.py), leaving out the one named in the refusal."""
    spec = JamSpec(style=StyleSpec(), seed=1, stream=StreamConfig(chunk_frames=10))

    async def start_past_capacity() -> OverCapacity:
        sid = (await core.start(spec))["session_id"]
        try:
            with pytest.raises(OverCapacity) as full:
                await core.start(spec)
        finally:
            await core.stop(sid)
        return full.value

    assert asyncio.run(start_past_capacity()).replica == core.replica_tag
    broken = GeneratorCore("tiny", repo=str(tmp_path / "missing"), max_sessions=1,
                           buckets=(1,), replica_tag="r2")
    try:
        assert wait_for_boot(broken) == "error"
        # where it tried to load, reported even though it failed
        assert broken.device is not None and broken.device.startswith("cpu:")
        with pytest.raises(Unavailable) as down:
            asyncio.run(broken.start(spec))
        assert down.value.replica == "r2"
    finally:
        broken.shutdown()


def test_a_session_nobody_asks_about_expires_and_a_waiting_one_does_not(core):
    """A polled jam whose client is gone would hold its replica's slot for good."""
    spec = JamSpec(style=StyleSpec(), seed=1, stream=StreamConfig(chunk_frames=250))

    async def scenario() -> None:
        sid = (await core.start(spec))["session_id"]
        assert core.expire_idle(time.monotonic() + core.idle_seconds / 2) == []
        await core.status(sid)  # any call for the session counts
        assert core.expire_idle(time.monotonic() + core.idle_seconds + 1) == [sid]
        with pytest.raises(UnknownSession, match="expired: no request for 300 s"):
            await core.status(sid)

        # a long-poll is a client still there: 10 s chunks paced in real time, so the
        # second is ~10 s away whatever the step's speed (as fast as it comes, asap, it
        # could land within the half second below on a fast box, and the poll end)
        paced = dataclasses.replace(spec, stream=dataclasses.replace(spec.stream,
                                                                     pace="realtime"))
        sid = (await core.start(paced))["session_id"]
        assert await core.next_chunk(sid, timeout=60) is not None
        waiting = asyncio.create_task(core.next_chunk(sid, timeout=60))
        await asyncio.sleep(0.5)
        assert core.expire_idle(time.monotonic() + core.idle_seconds + 1) == []
        await core.stop(sid)
        assert await waiting is None

        # and the step loop expires idle sessions by itself
        core.idle_seconds = 1.0
        try:
            sid = (await core.start(spec))["session_id"]
            deadline = time.monotonic() + 30
            while core.session_count:
                assert time.monotonic() < deadline, "the idle session never expired"
                await asyncio.sleep(0.2)
            with pytest.raises(UnknownSession, match="expired"):
                await core.status(sid)
        finally:
            core.idle_seconds = 300.0

    asyncio.run(scenario())


def test_a_replica_shut_down_while_compiling_stops_after_the_compile_under_way(tiny):
    """Its thread leaves XLA before shutdown returns (killed inside a compile at exit,
    the process would abort) instead of compiling every bucket first. Bucket sizes no
    other test uses, so that no compile is already in this process's caches."""
    core = GeneratorCore("tiny", loaded=tiny, max_sessions=7, buckets=(3, 5, 6, 7))
    core.shutdown(timeout=120)
    assert (core.state, core.error) == ("stopped", "shut down while compiling")
    assert core.warmed == [3] and core.engine is None
