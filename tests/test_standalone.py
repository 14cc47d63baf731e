"""`mrt-serve local`: the API served from one process without Ray, started as a user
starts it, from a config file of the same format `serve run` reads."""

from __future__ import annotations

import contextlib
import json
import pathlib
import signal
import subprocess
import sys

import pytest
import yaml

from serve_app.client import run as record_jam
from serve_app.config import load_app_config
from serve_app.standalone import build_app, build_generators

from .generator_cores import wait_for_boot, wait_until_ready
from .serve_fixtures import free_port, tiny_config, wait_ready

ROOT = pathlib.Path(__file__).resolve().parents[1]


def write_config(path: pathlib.Path, args: dict, port: int) -> pathlib.Path:
    path.write_text(yaml.safe_dump({
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{"name": "mrt", "route_prefix": "/",
                          "import_path": "deployments.app:build_app", "args": args}],
    }))
    return path


def mrt_serve(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "serve_app.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.fixture(scope="module")
def local_server(tiny_repo, tmp_path_factory):
    port = free_port()
    config = write_config(tmp_path_factory.mktemp("local") / "local.yaml",
                          tiny_config(tiny_repo, max_sessions=2, buckets=(1, 2)), port)
    server = mrt_serve("local", str(config))
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, timeout=300)
    except TimeoutError:
        server.kill()
        raise AssertionError(
            f"mrt-serve local did not become ready: {server.communicate()}") from None
    yield base, server
    if server.poll() is None:
        server.kill()
        server.wait()


def test_serves_a_jam_and_the_benchmark_from_one_process(local_server, tmp_path):
    base, _ = local_server
    url = base.replace("http://", "ws://")
    rec = record_jam(url, {"styles": "ambient", "chunk_seconds": 0.2, "seed": 3}, 1.0)
    assert rec.audio.shape[1] == 2 and rec.audio.shape[0] >= 48_000
    assert rec.summary()["session_id"].endswith("@local")

    report = tmp_path / "bench.json"
    bench = subprocess.run(
        [sys.executable, str(ROOT / "scripts/bench_serve.py"), "--url", url, "--sessions",
         "2", "--seconds", "2", "--chunk-seconds", "0.2", "--json", str(report)],
        capture_output=True, text=True, timeout=300)
    assert bench.returncode == 0, bench.stderr
    run = json.loads(report.read_text())["runs"][0]
    assert run["failed_sessions"] == 0, run["errors"]
    assert run["overhead_ms_p50"] is not None and run["overhead_ms_p50"] >= 0
    steps = run["generator_steps"]  # the in-process generator's histogram, via /health
    assert steps["replicas"] == ["local"] and 1 <= steps["rows_per_step_mean"] <= 2


def test_says_when_it_is_ready_and_stops_cleanly_on_sigterm(local_server):
    _, server = local_server
    server.send_signal(signal.SIGTERM)
    _, err = server.communicate(timeout=60)
    assert server.returncode == 0, err
    assert "serving tiny (/health shows readiness)" in err
    assert "mrt-serve local: tiny ready after" in err and "buckets [1, 2]" in err
    assert err.rstrip().endswith("mrt-serve local: stopped")  # step loops stopped first
    assert "Traceback" not in err


@pytest.mark.parametrize(("args", "error"), [
    ({"variants": [{"name": "tiny"}], "default_variant": "b"},
     "default_variant: 'b' is not among ['tiny']"),
    ({"variants": [{"name": "tiny", "max_sessions": 0}]},
     "variants.0.max_sessions: Input should be greater than or equal to 1"),
])
def test_a_config_it_cannot_serve_is_refused_naming_the_field(tmp_path, args, error):
    config = write_config(tmp_path / "bad.yaml", args, free_port())
    refused = mrt_serve("local", str(config))
    _, err = refused.communicate(timeout=120)
    assert refused.returncode == 2
    assert f"error: {error}" in err


@contextlib.contextmanager
def generators(config, **options):
    """build_generators' cores, their step loops stopped after."""
    cores = build_generators(config, **options)
    try:
        yield cores
    finally:
        for core in cores.values():
            core.shutdown()


def test_random_weights_read_no_checkpoint_files(tmp_path):
    """What a benchmark on a bare GPU box needs: a variant whose repo is not there serves
    random weights and mock styles, where it would otherwise fail naming the repo."""
    from fastapi.testclient import TestClient

    missing = tmp_path / "no-such-repo"
    config = load_app_config({"variants": [{"name": "tiny", "repo": str(missing),
                                            "max_sessions": 1, "buckets": [1]}],
                              "style_embedder": {"mock": False, "repo": str(missing)}})
    with generators(config) as cores:
        assert wait_for_boot(cores["tiny"]) == "error" and "no-such-repo" in cores["tiny"].error
    with generators(config, random_weights=True) as cores:
        wait_until_ready(cores["tiny"])
        with TestClient(build_app(config, cores, random_weights=True)) as http:
            health = http.get("/health").json()
            assert health["status"] == "ready" and health["styles"]["mock"]
            render = http.post("/generate_style", data={"styles": "ambient", "bpm": 240,
                                                        "bars": 1, "seed": 1})
            assert render.status_code == 200, render.text
            assert render.json()["metadata"]["styles"] == ["ambient"]
