"""Two generator replicas of one variant through real Ray Serve: every call for a
session reaches the replica that holds it, a new session goes to a replica that can
take it, /health, /model/status, /jam/stop_all and the benchmark reach every
replica, a model switch reaches both, and a replica that dies takes only its own
sessions with it.

A third application ("pool", under /pool) on the test session's Ray Serve instance:
tiny, two generator replicas of one session each, so that after the first start
exactly one replica can take the next, and a blind choice between the two misses half
the time; and two ingress replicas, as configs/serve.yaml has.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import time

import httpx
import pytest

from serve_app.generator import replica_of

from .serve_fixtures import deploy, tiny_config


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
    steps = run["generator_steps"]  # one session per replica, each in its own 1-row steps
    assert len(steps["replicas"]) == 2 and steps["rows_per_step_mean"] == 1.0
    assert steps["steps"] >= 2 * 2 * 25  # 2 s of 40 ms frames on each replica


def tiny_replica_states(http) -> tuple[dict, dict[str, str]]:
    """The tiny variant's /health entry, and each of its replicas' state."""
    tiny = http.get("/health").json()["variants"]["tiny"]
    return tiny, {r["replica"]: r["state"] for r in tiny["replicas"]}


def test_a_dead_replica_loses_only_its_own_sessions(http):
    import ray

    doomed, survivor = one_on_each(http)
    actors = [a for a in ray.util.list_named_actors(all_namespaces=True)
              if "Generator_tiny" in a["name"] and replica_of(doomed) in a["name"]]
    assert len(actors) == 1, actors
    ray.kill(ray.get_actor(actors[0]["name"], namespace=actors[0]["namespace"]))
    # a start now finds the survivor full and the other replica dead: refused, clearly
    refused = start(http, expect=429)
    assert "full" in refused["error"], refused

    deadline = time.monotonic() + 120
    survivor_index = next_index(http, survivor)
    while True:  # the survivor streams on while the dead replica's session fails loudly
        r = http.get("/jam/next", params={"session_id": doomed, "timeout": 1})
        if r.status_code == 404:
            break
        assert time.monotonic() < deadline, r.text
        survivor_index, last = next_index(http, survivor), survivor_index
        assert survivor_index == last + 1
    assert "start a new session" in r.json()["error"]
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
