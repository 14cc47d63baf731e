"""A real Ray Serve instance running our application graph on the tiny variant."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import time

import httpx

from serve_app.ports import free_port


def tiny_config(repo, *, max_sessions: int = 4, buckets=(1, 2, 4), api: dict | None = None,
                ingress_replicas: int = 1):
    return {
        "default_variant": "tiny",
        "variants": [{"name": "tiny", "repo": str(repo), "max_sessions": max_sessions,
                      "buckets": list(buckets), "num_cpus": 1}],
        "style_embedder": {"mock": True},
        "ingress": {"num_replicas": ingress_replicas},
        "api": {"max_backlog_chunks": 4, "ws_max_lead_seconds": 4.0, **(api or {})},
    }


def wait_ready(base: str, timeout: float = 300, headers: dict | None = None) -> dict:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = httpx.get(f"{base}/health", timeout=10, headers=headers).json()
            if last.get("status") == "ready":
                return last
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(1)
    raise TimeoutError(f"server not ready after {timeout}s: {last}")


@contextlib.contextmanager
def ray_serve():
    """Ray and Serve, started once per test session (Ray start costs ~10 s); apps are
    deployed onto it with `deploy`. Logical CPUs are accounting only: 8 fit two apps. The
    one logical GPU is Ray's accounting too (JAX in a replica placed on it runs on CPU):
    it makes the cluster a one-GPU box for `test_serve_placement`."""
    import ray
    from ray import serve

    from deployments.transport import NODE_ENV

    os.environ.update(NODE_ENV)  # read by the proxy Ray starts, as scripts/serve sets it
    ray.init(num_cpus=8, num_gpus=1, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"JAX_PLATFORMS": "cpu"}})
    try:
        for attempt in range(3):  # a free port can be taken by Ray itself before Serve binds
            port = free_port()
            try:
                serve.start(http_options={"host": "127.0.0.1", "port": port})
                break
            except Exception:
                serve.shutdown()
                if attempt == 2:
                    raise
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def deploy(root: str, config: dict, *, name: str = "mrt", route_prefix: str = "/",
           headers: dict | None = None) -> str:
    """Deploys our graph as application `name` under `route_prefix`; its base URL once
    ready (asked with `headers`: an app with API keys needs one for /health too)."""
    from ray import serve

    from deployments.app import build_app

    serve.run(build_app(config), name=name, route_prefix=route_prefix, blocking=False)
    base = root + route_prefix.rstrip("/")
    wait_ready(base, headers=headers)
    return base


def recv_json(ws, kind: str | None = None, timeout: float = 60) -> dict:
    """The next JSON message (skipping binary frames and, if `kind`, other types)."""
    deadline = time.monotonic() + timeout
    while True:
        message = ws.recv(timeout=max(0.1, deadline - time.monotonic()))
        if isinstance(message, bytes):
            continue
        data = json.loads(message)
        if kind is None or data["type"] == kind or data["type"] == "error":
            return data


def start_jam(url: str, **params):
    """A WebSocket jam of 0.2 s pcm16 chunks (5 frames each): its socket and session id."""
    from websockets.sync.client import connect

    ws = connect(url)
    ws.send(json.dumps({"type": "start", "binary_audio": True, "audio_format": "pcm16",
                        "params": {"styles": "ambient", "chunk_seconds": 0.2, **params}}))
    started = recv_json(ws)
    assert started["type"] == "started", started
    return ws, started["session_id"]


def follow_move(ws, session_id: str, heard: list[dict], after: int = 5,
                timeout: float = 60, chunk_frames: int = 5) -> dict:
    """Reads a `start_jam` stream through its move to another replica; returns the
    `moved` status once `after` chunks have come after it (those before it join
    `heard`, the chunks read so far). Checks what every move keeps: the listener's
    chunk indices and frames run on, and the new session starts from tiny's whole
    context of codes heard."""
    moved, later = None, []
    while len(later) < after:
        message = recv_json(ws, timeout=timeout)
        assert message["type"] in ("chunk_meta", "status"), message
        if message["type"] == "status":
            moved = message
        else:
            (heard if moved is None else later).append(message)
    assert moved["event"] == "moved" and moved["previous_session_id"] == session_id, moved
    assert moved["context_frames"] == 25, moved
    indices = [m["index"] for m in heard + later]
    assert indices == list(range(len(indices))) and later[0]["index"] == moved["next_index"]
    assert [m["metadata"]["first_frame"] for m in heard + later] == [
        chunk_frames * i for i in indices]
    return moved


def replica_processes(deployment: str, app: str = "mrt") -> dict[int, str]:
    """/proc/<pid>/maps of each process Ray runs a replica of `app`'s `deployment` in
    (Ray titles them `ray::ServeReplica:<app>:<deployment>`)."""
    found = {}
    for proc in pathlib.Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().split(b"\0")[0] == (
                    f"ray::ServeReplica:{app}:{deployment}".encode()):
                found[int(proc.name)] = (proc / "maps").read_text()
        except OSError:  # a process that ended while looked at
            continue
    return found

