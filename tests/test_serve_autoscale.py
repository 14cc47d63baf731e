"""Generators scale on live sessions through real Ray Serve (deployments/autoscaling.py):
a second replica joins when the sessions pass the target, and when they fall Serve stops
a replica again; a WebSocket stream on the replica it stops moves to the one left and
plays on (serve_app/api/resume.py).

Its own application ("scale", under /scale) on the test session's Ray Serve instance:
tiny, one to two generator replicas of at most 2 sessions each, a target of one session
per replica and short delays. On one node Serve stops the newest replica first, so the
stream is put on the replica that autoscaling added.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

from serve_app.jam_spec import replica_of

from .serve_fixtures import deploy, follow_move, recv_json, start_jam, tiny_config

AUTOSCALING = {
    "min_replicas": 1, "max_replicas": 2, "upscale_delay_s": 0, "downscale_delay_s": 1,
    "metrics_interval_s": 0.5, "look_back_period_s": 2,
    "policy": {"policy_function": "deployments.autoscaling:SessionsPolicy",
               "policy_kwargs": {"target_sessions_per_replica": 1}},
}


@pytest.fixture(scope="module")
def base(serve_root, tiny_repo):
    from ray import serve

    config = tiny_config(tiny_repo, max_sessions=2, buckets=(1, 2))
    config["variants"][0].update(num_cpus=0.5, autoscaling_config=AUTOSCALING)
    url = deploy(serve_root, config, name="scale", route_prefix="/scale")
    yield url
    serve.delete("scale")


def replicas(http: httpx.Client) -> dict[str, dict]:
    tiny = http.get("/health").json()["variants"]["tiny"]
    return {r["replica"]: r for r in tiny["replicas"]}


def wait_for(http: httpx.Client, ready: int, timeout: float = 240) -> dict[str, dict]:
    """The replicas once exactly `ready` of them are ready (and no other is running)."""
    deadline = time.monotonic() + timeout
    while True:
        now = replicas(http)
        if len(now) == ready and all(r["state"] == "ready" for r in now.values()):
            return now
        assert time.monotonic() < deadline, now
        time.sleep(0.5)


def test_a_stream_on_the_replica_a_scale_down_stops_moves_to_the_one_left(base):
    ws_url = base.replace("http://", "ws://") + "/ws/jam"
    with httpx.Client(base_url=base, timeout=60) as http:
        (first,) = wait_for(http, 1)
        a, sid_a = start_jam(ws_url)
        b, sid_b = start_jam(ws_url)
        assert {replica_of(sid_a), replica_of(sid_b)} == {first}
        added = set(wait_for(http, 2)) - {first}  # two sessions, a target of one each
        assert len(added) == 1
        c, sid_c = start_jam(ws_url)  # the first replica is full: the added one takes it
        assert replica_of(sid_c) in added
        heard = [recv_json(c, "chunk_meta") for _ in range(8)]
        for ws in (a, b):  # one session left: one replica is enough, the newest goes
            ws.send(json.dumps({"type": "stop"}))
            assert recv_json(ws, "stopped")["type"] == "stopped"
            ws.close()

        moved = follow_move(c, sid_c, heard, timeout=120)
        assert replica_of(moved["session_id"]) == first
        assert set(wait_for(http, 1)) == {first}
        c.send(json.dumps({"type": "stop"}))
        assert recv_json(c, "stopped")["session_id"] == moved["session_id"]
        c.close()
