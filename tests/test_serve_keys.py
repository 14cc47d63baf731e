"""API keys through Ray Serve: an app deployed with keys refuses a WebSocket without
one, and our own clients (the `mrt-serve jam` CLI and scripts/bench_serve.py) reach it
with `--api-key`."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest
from websockets.exceptions import ConnectionClosedError
from websockets.sync.client import connect

from .browser import open_page
from .serve_fixtures import deploy, tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
KEY = "k1"


@pytest.fixture(scope="module")
def keyed(serve_root, tiny_repo):
    from ray import serve

    config = tiny_config(tiny_repo, max_sessions=2, buckets=(1, 2),
                         api={"api_keys": [KEY], "admin_keys": ["root"]})
    base = deploy(serve_root, config, name="keyed", route_prefix="/keyed",
                  headers={"X-API-Key": KEY})
    yield base
    serve.delete("keyed")  # frees its replicas for the modules after this one


def test_a_websocket_without_a_valid_key_is_told_why(keyed):
    """Closed with code 4401 and the reason, which a browser's app can read (a refused
    handshake would be a bare 403 it cannot)."""
    url = keyed.replace("http://", "ws://") + "/ws/jam"
    for headers in ({}, {"X-API-Key": "wrong"}):
        with connect(url, additional_headers=headers) as ws, \
                pytest.raises(ConnectionClosedError) as closed:
            ws.recv(timeout=30)
        assert closed.value.rcvd.code == 4401
        assert "api key: missing or not valid" in closed.value.rcvd.reason


def test_the_tester_page_shows_why_the_server_refused_it(keyed, serve_base, tmp_path):
    """A musician who typed a wrong key reads the reason on the page, not only a code."""
    url = keyed.replace("http://", "ws://") + "/ws/jam"
    with open_page(f"{serve_base}/tester", tmp_path / "tester.png") as (page, errors):
        page.wait_for_function("document.querySelector('#variant').options.length > 0")
        page.fill("#url", url)
        page.fill("#apikey", "wrong")
        page.click("#start")
        page.wait_for_function("window.mrtStats.errors.length > 0", timeout=60_000)
        assert page.text_content("#state") == "closed 4401"
        assert "closed 4401: api key: missing or not valid" in page.text_content("#log")
        assert not page.evaluate("window.mrtStats.started") and not errors
        assert page.is_enabled("#start")  # ready to try again with the right key


def test_the_jam_cli_and_bench_serve_send_the_key(keyed, tmp_path):
    url = keyed.replace("http://", "ws://")
    out = tmp_path / "jam.wav"
    jam = subprocess.run(
        [sys.executable, "-m", "serve_app.cli", "jam", "--url", url, "--api-key", KEY,
         "--seconds", "1", "--chunk-seconds", "0.2", "--out", str(out)],
        capture_output=True, text=True, timeout=300)
    assert jam.returncode == 0, jam.stderr
    assert out.stat().st_size > 0

    for key in (KEY, None):
        report = tmp_path / f"bench-{key}.json"
        bench = subprocess.run(
            [sys.executable, str(ROOT / "scripts/bench_serve.py"), "--url", url,
             "--sessions", "1", "--seconds", "1", "--chunk-seconds", "0.2",
             "--json", str(report), *(["--api-key", key] if key else [])],
            capture_output=True, text=True, timeout=300)
        run = json.loads(report.read_text())["runs"][0]
        if key:
            assert bench.returncode == 0, bench.stderr
            assert run["failed_sessions"] == 0, run["errors"]
            assert run["generator_steps"]["steps"] > 0  # /health was read with the key
        else:
            # the report is written, and the run fails: nothing was measured
            assert bench.returncode == 1 and "error: no session ran" in bench.stderr
            assert run["failed_sessions"] == 1 and "api key" in run["errors"][0]
            assert run["generator_steps"] is None
