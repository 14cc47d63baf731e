"""`mrt-serve local`: the API served from one process without Ray, started as a user
starts it, from a config file of the same format `serve run` reads."""

from __future__ import annotations

import contextlib
import functools
import json
import pathlib
import signal
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import yaml

from serve_app.client import run as record_jam
from serve_app.config import load_app_config
from serve_app.ports import free_port
from serve_app.standalone import build_app, build_generators

from .browser import open_page
from .generator_cores import wait_for_boot, wait_until_ready
from .script_modules import load_script
from .serve_fixtures import tiny_config, wait_ready
from .test_loops import LOOP

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
def sites(tmp_path_factory):
    """Two origins serving a blank page, as a musician's web app hosted elsewhere: the
    config allows the first (CORS), not the second."""
    folder = tmp_path_factory.mktemp("site")
    (folder / "index.html").write_text("<!doctype html><title>a web app</title>")
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(folder))
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), handler) for _ in range(2)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield [f"http://127.0.0.1:{server.server_address[1]}" for server in servers]
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def local_server(tiny_repo, tmp_path_factory, sites):
    port = free_port()
    args = tiny_config(tiny_repo, max_sessions=2, buckets=(1, 2),
                       api={"cors_origins": [sites[0]]})
    config = write_config(tmp_path_factory.mktemp("local") / "local.yaml", args, port)
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
    assert rec.stopped["session_id"] == rec.summary()["session_id"]  # closed after `stopped`

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


# In the page: the calls a web app makes (a preflighted POST of a form with a key header,
# a JSON stop, a WebSocket jam), each answer's status, or the refusal.
CALLS_FROM_A_PAGE = """async (base) => {
    const said = async (call) => {
        try { const r = await call(); return [r.status, await r.json()]; }
        catch (e) { return ['refused', String(e)]; }
    };
    const form = new FormData();
    form.append('styles', 'ambient');
    const started = await said(() => fetch(base + '/jam/start', {
        method: 'POST', body: form, headers: {'X-API-Key': 'unused here'}}));
    const stopped = started[0] === 200 ? await said(() => fetch(base + '/jam/stop', {
        method: 'POST', headers: {'Content-Type': 'application/json'},
        body: JSON.stringify({session_id: started[1].session_id})})) : null;
    const socket = await new Promise((resolve) => {
        const ws = new WebSocket(base.replace('http', 'ws') + '/ws/jam');
        ws.onopen = () => ws.send(JSON.stringify(
            {type: 'start', params: {styles: 'ambient', chunk_seconds: 0.2}}));
        ws.onmessage = (e) => {
            ws.send(JSON.stringify({type: 'stop'}));
            resolve(JSON.parse(e.data).type);
        };
        ws.onclose = (e) => resolve(`closed ${e.code}: ${e.reason}`);
    });
    return {health: await said(() => fetch(base + '/health')), started, stopped, socket};
}"""

# what any page can do to a server without asking (no preflight for a form), reading
# nothing back: stop every jam on it
BLIND_STOP_ALL = """async (base) => {
    const r = await fetch(base + '/jam/stop_all', {method: 'POST', mode: 'no-cors',
                                                   body: new FormData()});
    return r.type;
}"""


def test_a_web_app_on_an_allowed_origin_jams_from_the_browser(local_server, sites, tmp_path):
    """A real Chromium on another origin: the configured one starts and stops a jam
    (preflights and all) and opens a WebSocket jam; one not configured is refused by the
    browser (reading HTTP answers) and by the server (its WebSocket, which browsers apply
    no CORS to, and a form it sends blind); the server's own pages are not refused."""
    base, _ = local_server
    with open_page(sites[0], tmp_path / "allowed.png") as (page, errors):
        calls = page.evaluate(CALLS_FROM_A_PAGE, base)
    assert calls["health"][0] == 200 and calls["health"][1]["status"] == "ready", calls
    assert calls["started"][0] == 200 and calls["started"][1]["session_id"], calls
    assert calls["stopped"][0] == 200 and calls["socket"] == "started", calls
    assert not errors
    with open_page(sites[1], tmp_path / "other.png") as (page, _):
        calls = page.evaluate(CALLS_FROM_A_PAGE, base)
    assert calls["health"][0] == "refused" and calls["started"][0] == "refused", calls
    assert calls["socket"] == (f"closed 4403: origin: {sites[1]} may not open a WebSocket "
                               "here (not in api.cors_origins)"), calls
    # a jam of a client that is not a browser outlives the other origin's blind stop_all
    with httpx.Client(base_url=base, timeout=60) as http:
        session = http.post("/jam/start", data={"styles": "ambient"}).json()["session_id"]
        with open_page(sites[1], tmp_path / "blind.png") as (page, _):
            assert page.evaluate(BLIND_STOP_ALL, base) == "opaque"
        status = http.get("/jam/status", params={"session_id": session})
        assert status.status_code == 200, status.text
        assert http.post("/jam/stop", json={"session_id": session}).status_code == 200
    with open_page(base + "/", tmp_path / "own.png") as (page, _):
        calls = page.evaluate(CALLS_FROM_A_PAGE, base)
    assert calls["started"][0] == 200 and calls["socket"] == "started", calls


def test_says_when_it_is_ready_and_stops_cleanly_on_sigterm(local_server):
    _, server = local_server
    server.send_signal(signal.SIGTERM)
    _, err = server.communicate(timeout=60)
    assert server.returncode == 0, err
    assert "serving tiny (/health shows readiness)" in err
    # progress at the default log level: each bucket's compile, the forced runs', ready
    assert "generator tiny: compiled batch bucket 2 (2 of 2)" in err
    assert "generator tiny: compiled forced runs of [16, 4] frames (loop prefill)" in err
    assert "generator tiny: ready after" in err and "(buckets [1, 2])" in err
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
def generators(config):
    """build_generators' cores, their step loops stopped after."""
    cores = build_generators(config)
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
    assert cores["tiny"].random_weights_seed is None
    config.random_weights = True  # what `mrt-serve local --random-weights` sets
    with generators(config) as cores:
        wait_until_ready(cores["tiny"])
        with TestClient(build_app(config, cores)) as http:
            health = http.get("/health").json()
            assert health["status"] == "ready" and health["styles"]["mock"]
            assert health["variants"]["tiny"]["random_weights"]
            render = http.post("/generate_style", data={"styles": "ambient", "bpm": 240,
                                                        "bars": 1, "seed": 1})
            assert render.status_code == 200, render.text
            assert render.json()["metadata"]["styles"] == ["ambient"]
            # loops too: the codec's encoder is random as well
            assert health["variants"]["tiny"]["loop_encoder"]
            looped = http.post("/generate", data={"bpm": 240, "bars": 1, "seed": 1},
                               files={"loop_audio": ("loop.wav", LOOP)})
            assert looped.status_code == 200, looped.text
            assert looped.json()["metadata"]["context_frames"] == 25


def test_variant_narrows_the_config_and_the_default_and_split_follow():
    args = {"variants": [{"name": "a", "variant": "tiny"}, {"name": "b", "variant": "tiny"},
                         {"name": "c", "variant": "tiny"}],
            "default_variant": "a", "ab_split": {"a": 1, "b": 1, "c": 2}}
    whole = load_app_config(args)
    assert [v.name for v in whole.variants] == ["a", "b", "c"]
    config = load_app_config(args, only=["c", "b"])
    assert [v.name for v in config.variants] == ["b", "c"]  # the config's order
    assert config.default_variant == "b" and config.ab_split == {"b": 1, "c": 2}
    kept_default = load_app_config(args, only=["a"])
    assert kept_default.default_variant == "a" and kept_default.ab_split == {"a": 1}
    no_split = load_app_config({**args, "ab_split": {"a": 1}}, only=["b"])
    assert no_split.ab_split is None


@pytest.mark.parametrize(("args", "only", "error"), [
    ({"variants": [{"name": "tiny"}]}, ["tiny_ft"],
     "--variant: 'tiny_ft' is not among the config's variants ['tiny']"),
    # the config is checked whole: leaving its bad part out does not hide it
    ({"variants": [{"name": "tiny"}, {"name": "x", "variant": "tiny"}],
      "default_variant": "y"}, ["tiny"], "default_variant: 'y' is not among"),
])
def test_variant_is_checked_against_a_whole_valid_config(args, only, error):
    with pytest.raises(ValueError) as raised:
        load_app_config(args, only=only)
    assert error in str(raised.value)


def bench_local(config: pathlib.Path, *args: str) -> subprocess.CompletedProcess:
    """Started with SIGINT blocked and ignored, as the full suite's process passed it on
    (both survive fork and exec): the servers it stops must hear their signal all the same."""
    return subprocess.run([sys.executable, str(ROOT / "scripts/bench_local.py"), str(config),
                           *args], capture_output=True, text=True, timeout=600,
                          preexec_fn=deaf_to_sigint)


def deaf_to_sigint() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def test_bench_local_serves_one_variant_of_a_config_and_measures_it(tiny_repo, tmp_path):
    """What a GPU box without Ray runs: one command that starts `mrt-serve local` on one
    variant of a config, benchmarks it and stops it. The other variant's checkpoint is
    missing, so serving it too would fail its boot."""
    args = {"variants": [{"name": "broken", "variant": "tiny",
                          "repo": str(tmp_path / "no-such-repo")},
                         tiny_config(tiny_repo, max_sessions=2, buckets=(1, 2))["variants"][0]],
            "default_variant": "broken"}
    config = write_config(tmp_path / "two.yaml", args, free_port())
    report = tmp_path / "bench.json"
    done = bench_local(config, "--variant", "tiny", "--buckets", "1", "--", "--sessions",
                       "1", "--seconds", "1", "--chunk-seconds", "0.2", "--json", str(report))
    assert done.returncode == 0, done.stderr
    assert "serving tiny (" in done.stderr and "broken" not in done.stderr
    assert "generator tiny: ready after" in done.stderr
    assert "compiling 1 batch buckets [1]" in done.stderr  # --buckets, not the config's
    assert done.stderr.rstrip().endswith("mrt-serve local: stopped")  # stopped after
    bench = json.loads(report.read_text())
    assert bench["variant"] == "tiny" and bench["max_sessions_zero_underruns"] == 1
    assert bench["runs"][0]["generator_steps"]["replicas"] == ["local"]
    assert bench["device"].startswith("cpu:")  # on a GPU box: "gpu:NVIDIA H100 ..."

    # the variant that cannot boot: the benchmark says why, at once, not at its timeout
    failed = bench_local(config, "--variant", "broken", "--", "--json", str(report))
    assert failed.returncode == 1
    assert "--wait-ready: broken failed to start" in failed.stderr
    assert "no-such-repo" in failed.stderr


def test_bench_local_through_ray_serves_the_graph_on_random_weights(tmp_path):
    """What a GPU box with Ray carried runs: `serve run` of one variant of a config on a Ray
    instance of its own, random weights (its repo is not there, nor MusicCoCa), the
    config's buckets replaced; the benchmark measures it through Serve's proxy and ingress,
    and the Ray instance is gone after."""
    missing = str(tmp_path / "no-such-repo")
    args = {"variants": [{"name": "other", "variant": "tiny", "repo": missing},
                         {"name": "tiny", "repo": missing, "max_sessions": 4,
                          "buckets": [1, 2, 4], "num_cpus": 1}],
            "default_variant": "other", "ab_split": {"other": 1, "tiny": 1},
            "style_embedder": {"mock": False, "repo": missing}}
    config = write_config(tmp_path / "two.yaml", args, free_port())
    report = tmp_path / "bench.json"
    done = bench_local(config, "--variant", "tiny", "--buckets", "1,2", "--random-weights",
                       "--ray", "--", "--sessions", "1", "--seconds", "1",
                       "--chunk-seconds", "0.2", "--json", str(report))
    assert done.returncode == 0, done.stderr
    assert "Started a local Ray instance" in done.stderr
    assert "generator tiny: loading tiny with random weights" in done.stderr
    assert "compiling 2 batch buckets [1, 2]" in done.stderr and "other" not in done.stderr
    bench = json.loads(report.read_text())
    assert bench["variant"] == "tiny" and bench["random_weights"] is True
    assert bench["max_sessions_zero_underruns"] == 1
    assert bench["runs"][0]["generator_steps"]["replicas"] != ["local"]  # a Serve replica
    # `serve run` stopped Serve and its Ray on the SIGINT, not killed at the grace's end
    assert "did not stop within" not in done.stderr
    assert "Got KeyboardInterrupt, shutting down" in done.stdout + done.stderr


def test_bench_local_names_what_is_wrong_with_its_buckets(tmp_path, monkeypatch, capsys):
    """Refused before any server starts (in this process: its `main`, as the command
    line runs it), for either kind of server."""
    module = load_script("bench_local")
    config = write_config(tmp_path / "one.yaml", {"variants": [{"name": "tiny"}]}, free_port())
    for args, reason in [(["--buckets", "2"], "--buckets needs --variant"),
                         (["--variant", "tiny", "--buckets", "2,x"],
                          "argument --buckets: positive integers, comma-separated "
                          "(e.g. 1,2,4), got '2,x'"),
                         (["--variant", "nope", "--buckets", "2"],
                          "--variant: 'nope' is not among ['tiny']"),
                         (["--variant", "nope", "--ray"],
                          "--variant: 'nope' is not among the config's variants ['tiny']")]:
        monkeypatch.setattr(sys, "argv", ["bench_local.py", str(config), *args, "--",
                                          "--json", str(tmp_path / "b.json")])
        with pytest.raises(SystemExit) as refused:
            module.main()
        told = f"{refused.value.code}{capsys.readouterr().err}"
        assert refused.value.code != 0 and reason in told, told


def test_bench_local_fails_fast_when_the_server_dies(tmp_path):
    config = write_config(tmp_path / "one.yaml", {"variants": [{"name": "tiny"}]}, free_port())
    died = bench_local(config, "--variant", "tiny_ft", "--", "--json",
                       str(tmp_path / "never.json"))
    assert died.returncode == 1
    assert "error: --variant: 'tiny_ft' is not among the config's variants ['tiny']" \
        in died.stderr
    assert "bench_local: the server exited (status 2)" in died.stderr
    assert not (tmp_path / "never.json").exists()
