"""The generator's step loop in-process, on the real tiny model.

What the loop reports about its own speed (`mean_step_ms` in /health, the
`mrt_step_ms` metric, the message a session that fell behind gets) is what an
operator sizes replicas by, so it has to be the steps' own time.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from serve_app.errors import OverCapacity, Unavailable, UnknownSession
from serve_app.generator import GeneratorCore, JamSpec, StyleSpec
from serve_app.jam import StreamConfig

from .generator_cores import wait_for_boot, wait_until_ready


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
    assert core.steps - steps == frames
    assert 0 < core.step_seconds - step_seconds <= took


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

        # a long-poll is a client still there: 10 s chunks, the second is ~8 s away
        sid = (await core.start(spec))["session_id"]
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
