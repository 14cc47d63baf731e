"""Variants side by side through real Ray Serve: two tiny finetunes as two generator
deployments with an A/B split, model switches under live WebSocket sessions, and a
generator replica killed and brought back by Serve with the selected model.

A second application ("ab", under /ab) on the test session's Ray Serve instance.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import time

import httpx
import pytest
from websockets.sync.client import connect

from .serve_fixtures import deploy, recv_json

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ab(serve_root, finetunes, broken_finetune):
    config = {
        "default_variant": "tiny_a",
        "variants": [
            {"name": "tiny_a", "variant": "tiny", "repo": str(finetunes["a"]), "step": 100,
             "max_sessions": 4, "buckets": [1, 2, 4], "num_cpus": 1},
            {"name": "tiny_b", "variant": "tiny", "repo": str(finetunes["b"]), "step": 200,
             "max_sessions": 4, "buckets": [1, 2, 4], "num_cpus": 1},
        ],
        "ab_split": {"tiny_a": 1, "tiny_b": 1},
        "style_embedder": {"mock": True},
        "api": {"max_backlog_chunks": 4},
    }
    from ray import serve

    base = deploy(serve_root, config, name="ab", route_prefix="/ab")
    yield {"http": base, "ws": base.replace("http://", "ws://") + "/ws/jam",
           "broken": broken_finetune, **finetunes}
    serve.delete("ab")  # frees its replicas for the modules after this one


def start(ws, **params) -> dict:
    ws.send(json.dumps({"type": "start", "params": {"chunk_seconds": 0.2, "pace": "asap",
                                                     **params}}))
    started = recv_json(ws, "started")
    assert started["type"] == "started", started
    return started


def chunks(ws, n: int) -> list[int]:
    return [recv_json(ws, "chunk")["index"] for _ in range(n)]


def status(ab, variant: str) -> dict:
    return httpx.get(f"{ab['http']}/model/status", params={"variant": variant},
                     timeout=60).json()["variants"][variant]


def test_ab_assignment_is_sticky_per_client(ab):
    seen = {}
    for i in range(12):
        client = f"listener-{i}"
        with connect(ab["ws"]) as ws:
            first = start(ws, client_id=client)
        with connect(ab["ws"]) as ws:
            again = start(ws, client_id=client)
        assert first["assigned_by"] == "ab_split"
        assert again["variant"] == first["variant"]
        seen[client] = first["variant"]
    assert set(seen.values()) == {"tiny_a", "tiny_b"}
    # naming a variant overrides the split; HTTP jams use the same assignment
    with connect(ab["ws"]) as ws:
        named = start(ws, client_id="listener-0", variant="tiny_b")
        assert (named["variant"], named["assigned_by"]) == ("tiny_b", "request")
    r = httpx.post(f"{ab['http']}/jam/start", data={"client_id": "listener-3",
                                                    "chunk_seconds": "0.2"}, timeout=60)
    assert r.json()["variant"] == seen["listener-3"]
    httpx.post(f"{ab['http']}/jam/stop", json={"session_id": r.json()["session_id"]},
               timeout=60)
    variants = httpx.get(f"{ab['http']}/model/variants", timeout=60).json()
    assert variants["ab_split"] == {"tiny_a": 0.5, "tiny_b": 0.5}
    for name in ("tiny_a", "tiny_b"):
        counters = variants["variants"][name]["metrics"]
        assert counters["mrt_sessions_started"] >= 1 and counters["mrt_frames"] > 0


def test_the_benchmark_keeps_its_sessions_on_one_generator_under_a_split(ab, tmp_path):
    """bench_serve measures what one generator holds: without --variant its sessions name
    the server's default, where the A/B split would have spread them over both."""
    out = tmp_path / "ab.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts/bench_serve.py"), "--url", ab["ws"],
         "--sessions", "4", "--seconds", "2", "--chunk-seconds", "0.2", "--json", str(out)],
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads(out.read_text())
    assert report["variant"] == "tiny_a"
    sessions = report["runs"][0]["per_session"]
    assert [s["variant"] for s in sessions] == ["tiny_a"] * 4, sessions


def test_switch_under_a_live_session_leaves_no_gap(ab):
    with connect(ab["ws"]) as ws:
        started = start(ws, variant="tiny_a", window_chunks=2)
        indices = chunks(ws, 2)
        ws.send(json.dumps({"type": "ack", "index": 1}))
        r = httpx.post(f"{ab['http']}/model/select", timeout=300, json={
            "variant": "tiny_a", "repo_id": str(ab["b"]), "step": 200})
        assert r.status_code == 200, r.text
        assert r.json()["sessions_kept"] >= 1
        for _ in range(3):
            got = chunks(ws, 2)
            ws.send(json.dumps({"type": "ack", "index": got[-1]}))
            indices += got
        assert indices == list(range(8))
        ws.send(json.dumps({"type": "status"}))
        live = recv_json(ws, "status")
        assert live["session_id"] == started["session_id"]
        assert live["model"]["step"] == 200 and live["model"]["repo_id"] == str(ab["b"])


def test_corrupt_checkpoint_is_refused_while_a_session_keeps_streaming(ab):
    before = status(ab, "tiny_a")["model"]
    with connect(ab["ws"]) as ws:
        start(ws, variant="tiny_a", window_chunks=2)
        chunks(ws, 2)
        r = httpx.post(f"{ab['http']}/model/select", timeout=300, json={
            "variant": "tiny_a", "ckpt_repo": str(ab["broken"]), "ckpt_step": 300})
        assert r.status_code == 400 and "checkpoint_300.safetensors" in r.json()["error"]
        ws.send(json.dumps({"type": "ack", "index": 1}))
        assert chunks(ws, 2) == [2, 3]  # the old weights kept serving it
    after = status(ab, "tiny_a")
    assert after["model"] == before and after["switch"]["state"] == "failed"


def test_a_restarted_replica_comes_back_with_the_selected_model(ab):
    import ray

    r = httpx.post(f"{ab['http']}/model/select", timeout=300, json={
        "variant": "tiny_b", "ckpt_repo": str(ab["a"]), "ckpt_step": 100})
    assert r.status_code == 200, r.text
    old = status(ab, "tiny_b")
    assert old["model"]["step"] == 100
    (name,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
               if a["name"].startswith("SERVE_REPLICA::ab#Generator_tiny_b#")]
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    deadline = time.monotonic() + 300
    while True:
        assert time.monotonic() < deadline, "the replica did not come back"
        try:
            new = status(ab, "tiny_b")
            if new.get("replica") not in (None, old["replica"]) and new["state"] == "ready":
                break
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(1)
    assert new["model"] == old["model"]  # not the boot default (ft-b, step 200)
    assert new["boot_default"]["step"] == 200
    assert new["selection_generation"] == old["selection_generation"]
