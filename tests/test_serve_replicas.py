"""Two generator replicas of one variant through real Ray Serve: every call for a
session reaches the replica that holds it, a new session goes to a replica that can
take it, /health, /model/status, /jam/stop_all and the benchmark reach every
replica, a model switch reaches both, a replica that dies takes only its own sessions
with it (a stream with nowhere to move ends with the reason), and a WebSocket stream
whose replica dies moves to the other one.

A third application ("pool", under /pool) on the test session's Ray Serve instance:
tiny, two generator replicas of one session each, so that after the first start
exactly one replica can take the next, and a blind choice between the two misses half
the time; and two ingress replicas, as configs/serve.yaml has.
"""

from __future__ import annotations

import base64
import json
import pathlib
import subprocess
import sys
import time

import httpx
import pytest

from serve_app.jam_spec import replica_of

from .serve_fixtures import deploy, follow_move, recv_json, start_jam, tiny_config


def post_start(http) -> httpx.Response:
    return http.post("/jam/start", data={"styles": "ambient", "chunk_seconds": 0.2})


def start(http, expect: int = 200) -> dict:
    r = post_start(http)
    assert r.status_code == expect, r.text
    return r.json()


def next_index(http, sid: str) -> int:
    r = http.get("/jam/next", params={"session_id": sid})
    assert r.status_code == 200, r.text
    return r.json()["chunk"]["index"]


def stop(http, *sids: str) -> None:
    for sid in sids:
        assert http.post("/jam/stop", json={"session_id": sid}).status_code == 200


def one_on_each(http, timeout: float = 240) -> tuple[str, str]:
    """Two sessions, one per replica, once both replicas have loaded their model."""
    deadline = time.monotonic() + timeout
    while True:
        first = start(http)["session_id"]
        r = post_start(http)
        if r.status_code == 200:
            return first, r.json()["session_id"]
        stop(http, first)
        assert time.monotonic() < deadline, f"no second replica took a session: {r.text}"
        time.sleep(1)


@pytest.fixture(scope="module")
def http(serve_root, tiny_repo):
    from ray import serve

    config = tiny_config(tiny_repo, max_sessions=1, buckets=(1,))
    config["variants"][0].update(num_replicas=2, num_cpus=0.5)
    config["ingress"] = {"num_replicas": 2}
    base = deploy(serve_root, config, name="pool", route_prefix="/pool")
    with httpx.Client(base_url=base, timeout=120) as client:
        stop(client, *one_on_each(client))  # both replicas serve from here on
        yield client
    serve.delete("pool")  # frees its replicas for the modules after this one


@pytest.fixture(autouse=True)
def no_sessions_left(http):
    """A failed test leaves no session behind to fill a replica for the next one."""
    yield
    http.post("/jam/stop_all")


def test_a_new_session_goes_to_the_replica_with_room(http):
    for _ in range(10):
        first, second = start(http)["session_id"], start(http)["session_id"]
        assert replica_of(first) != replica_of(second)
        refused = start(http, expect=429)
        assert "no generator replica can take a session now (2 tried" in refused["error"]
        assert refused["error"].count("is full") == 2, refused
        stop(http, first, second)


def test_every_call_for_a_session_reaches_its_replica(http):
    sessions = one_on_each(http)
    try:
        for expected in range(6):
            for sid in sessions:
                assert next_index(http, sid) == expected
                assert http.post("/jam/consume", data={"session_id": sid,
                                                       "chunk_index": expected}).status_code == 200
                status = http.get("/jam/status", params={"session_id": sid})
                assert status.status_code == 200, status.text
                assert status.json()["last_consumed"] == expected
        update = http.post("/jam/update", data={"session_id": sessions[0], "temperature": 0.9})
        assert update.status_code == 200, update.text
    finally:
        stop(http, *sessions)


def test_health_counts_every_replica(http):
    sessions = one_on_each(http)
    try:
        for _ in range(5):  # whichever replica the router asks first
            tiny = http.get("/health").json()["variants"]["tiny"]
            assert tiny["state"] == "ready"
            assert (tiny["sessions"], tiny["max_sessions"]) == (2, 2)
            replicas = {r["replica"]: r for r in tiny["replicas"]}
            assert set(replicas) == {replica_of(sid) for sid in sessions}
            assert all(r["state"] == "ready" and r["sessions"] == 1 for r in replicas.values())
            assert http.get("/model/variants").json()["variants"]["tiny"]["sessions"] == 2
    finally:
        stop(http, *sessions)


def test_stop_all_ends_the_polled_jams_of_every_replica_whichever_ingress_is_asked(http):
    for _ in range(4):  # each time through either ingress replica, to either generator first
        sessions = one_on_each(http)
        assert http.post("/jam/stop_all").json()["stopped"] == 2
        for sid in sessions:
            r = http.get("/jam/status", params={"session_id": sid})
            assert r.status_code == 404 and "stopped by /jam/stop_all" in r.json()["error"]


def test_the_benchmark_adds_up_the_steps_of_both_replicas(http, tmp_path):
    out = tmp_path / "bench.json"
    url = str(http.base_url).rstrip("/").replace("http://", "ws://")
    bench = subprocess.run(
        [sys.executable, str(pathlib.Path(__file__).parents[1] / "scripts/bench_serve.py"),
         "--url", url, "--sessions", "2", "--seconds", "2", "--chunk-seconds", "0.2",
         "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert bench.returncode == 0, bench.stderr
    run = json.loads(out.read_text())["runs"][0]
    assert run["failed_sessions"] == 0, run["errors"]
    assert run["moved_sessions"] == 0  # no replica stopped: every stream stays where it is
    steps = run["generator_steps"]  # one session per replica, each in its own 1-row steps
    assert len(steps["replicas"]) == 2 and steps["rows_per_step_mean"] == 1.0
    assert steps["steps"] >= 2 * 2 * 25  # 2 s of 40 ms frames on each replica


def tiny_replica_states(http) -> tuple[dict, dict[str, str]]:
    """The tiny variant's /health entry, and each of its replicas' state."""
    tiny = http.get("/health").json()["variants"]["tiny"]
    return tiny, {r["replica"]: r["state"] for r in tiny["replicas"]}


def ws_url(http) -> str:
    return str(http.base_url).rstrip("/").replace("http://", "ws://") + "/ws/jam"


def kill_replica(replica: str) -> None:
    import ray

    actors = [a for a in ray.util.list_named_actors(all_namespaces=True)
              if "Generator_tiny" in a["name"] and replica in a["name"]]
    assert len(actors) == 1, actors
    ray.kill(ray.get_actor(actors[0]["name"], namespace=actors[0]["namespace"]))


def test_a_dead_replica_loses_only_its_own_sessions(http):
    """One kill, with the other replica full: the stream on the dead one cannot move and
    ends with the reason (its socket stays usable), the other replica's session plays on,
    a start is refused clearly, and Serve's replacement loads while the service stays
    ready. (A polled session on a dead replica: `test_serve_http`.)"""
    stop(http, *one_on_each(http))
    ws, doomed = start_jam(ws_url(http))
    with ws:
        survivor = start(http)["session_id"]  # the other replica is full now
        assert replica_of(survivor) != replica_of(doomed)
        recv_json(ws, "chunk_meta")
        survivor_index = next_index(http, survivor)
        kill_replica(replica_of(doomed))
        # a start now finds the survivor full and the other replica dead: refused, clearly
        refused = start(http, expect=429)
        assert "full" in refused["error"], refused
        error = recv_json(ws, "error")
        assert error["type"] == "error", error
        assert f"unknown session {doomed}" in error["error"], error
        assert "moving the stream to another replica failed" in error["error"], error
        assert error["error"].endswith("start a new session"), error
        ws.send(json.dumps({"type": "ping"}))  # the socket itself is fine
        assert recv_json(ws, "pong")["type"] == "pong"
        ws.send(json.dumps({"type": "status"}))
        assert recv_json(ws, "status")["session_id"] is None
        # and the survivor streamed on throughout
        assert next_index(http, survivor) == survivor_index + 1
    stop(http, survivor)

    # Serve replaces the dead replica. While the replacement loads its model the
    # service stays ready and new sessions go to the survivor, which has room again.
    deadline = time.monotonic() + 240
    loading_starts = 0
    while True:
        tiny, states = tiny_replica_states(http)
        assert tiny["state"] == "ready", tiny  # the survivor is
        if sorted(states.values()) == ["ready", "ready"]:
            break
        if "initializing" in states.values():
            sid = start(http)["session_id"]
            stop(http, sid)
            if replica_of(sid) != replica_of(survivor):
                # only if the replacement turned ready since /health was read
                _, now = tiny_replica_states(http)
                assert now.get(replica_of(sid)) == "ready", (sid, now)
                continue
            loading_starts += 1
        assert time.monotonic() < deadline, states
        time.sleep(0.1)
    assert loading_starts, "the replacement replica was never seen loading"
    assert set(states) - {replica_of(survivor), replica_of(doomed)}  # a new replica
    fresh = one_on_each(http)
    assert {replica_of(sid) for sid in fresh} == set(states)
    assert [next_index(http, sid) for sid in fresh] == [0, 0]


def test_a_websocket_stream_moves_to_another_replica_when_its_own_dies(http):
    """The listener keeps hearing one stream: told of the move, chunk indices and
    frames run on, and the new session starts from the codes it heard last. A reseed
    answered just before still opens the chunk it was promised for."""
    from .test_loops import LOOP

    stop(http, *one_on_each(http))  # both replicas serve (the one before was replaced)
    ws, sid = start_jam(ws_url(http), seed=3, chunk_seconds=1.0)
    with ws:
        heard = [recv_json(ws, "chunk_meta") for _ in range(2)]  # 50 frames: > 25 context
        ws.send(json.dumps({"type": "reseed", "loop_audio_b64": base64.b64encode(LOOP).decode()}))
        while (message := recv_json(ws))["type"] == "chunk_meta":
            heard.append(message)
        assert message["event"] == "reseed", message
        # Its chunk is at least one chunk (1 s) away: the replica dies before it is made.
        kill_replica(replica_of(sid))
        moved = follow_move(ws, sid, heard, after=2, chunk_frames=25)
        assert moved["reseed_applies_from_chunk"] == message["applies_from_chunk"], moved
        assert moved["next_index"] <= message["applies_from_chunk"], (moved, message)
        assert "no longer running" in moved["reason"] or "died" in moved["reason"], moved
        assert "new session" not in moved["reason"]  # the stream goes on: no advice to start one
        assert replica_of(moved["session_id"]) not in (replica_of(sid), None)
        assert moved["moves"] == 1

        ws.send(json.dumps({"type": "status"}))
        status = recv_json(ws, "status")
        assert status["session_id"] == moved["session_id"] and status["moves"] == 1, status
        ws.send(json.dumps({"type": "stop"}))
        assert recv_json(ws, "stopped")["session_id"] == moved["session_id"]
    stop(http, *one_on_each(http))  # the dead replica's replacement serves again


def test_a_model_switch_shows_on_every_replica(http, finetunes):
    """A switch is made on one replica and followed by the other; /model/status shows
    each one's model. (Last in the module: the pool serves the finetune from here.)"""
    r = http.post("/model/select", json={"repo_id": str(finetunes["a"]), "step": 100})
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 120
    while True:
        tiny = http.get("/model/status").json()["variants"]["tiny"]
        if [rep["model"]["step"] for rep in tiny["replicas"]] == [100, 100]:
            break
        assert time.monotonic() < deadline, tiny["replicas"]
        time.sleep(0.5)
    assert tiny["model"]["step"] == 100 and tiny["max_sessions"] == 2
