"""Model management in-process: /model/* over a real GeneratorCore, two tiny finetunes
made by scripts/make_tiny_checkpoint.py, and a selection store on disk.

The same routes through Ray Serve (live WebSocket sessions, A/B, a restarted
replica) are in tests/test_serve_models.py.
"""

from __future__ import annotations

import base64
import io
import shutil
import time

import numpy as np
import pytest
import soundfile as sf
from fastapi.testclient import TestClient

from serve_app.api.ab import ABSplit
from serve_app.api.app import create_app
from serve_app.api.settings import ApiSettings
from serve_app.config import AppConfig, apply_boot_env
from serve_app.generator import GeneratorCore
from serve_app.selection import (
    FileSelectionStore,
    ModelSelection,
    SelectionRecord,
    stored_for_boot,
)
from serve_app.styles.service import StyleService

from .generator_cores import wait_until_ready


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return FileSelectionStore(tmp_path_factory.mktemp("selections"))


@pytest.fixture(scope="module")
def core(tiny, store):
    core = GeneratorCore("tiny", loaded=tiny, max_sessions=2, buckets=(1, 2), store=store,
                         selection_poll_seconds=0.2)
    yield core
    core.shutdown()


@pytest.fixture(scope="module")
def http(core, tiny):
    app = create_app({"tiny": core}, StyleService(tiny.style), ApiSettings())
    with TestClient(app) as client:
        for _ in range(600):
            if client.get("/health").json()["status"] == "ready":
                break
            time.sleep(0.5)
        yield client


@pytest.fixture(scope="module")
def bad_repos(tmp_path_factory, finetunes, broken_finetune):
    """A v1 repo (T5X archive only), and a repo with a truncated and an unreadable step."""
    v1 = tmp_path_factory.mktemp("v1")
    (v1 / "checkpoint_1863001.tgz").write_bytes(b"\x1f\x8b not a real archive")
    shutil.copy(finetunes["a"] / "mean_style_embed.npy", v1)
    return {"v1": v1, "broken": broken_finetune}


def first_chunk_audio(http, seed: int) -> np.ndarray:
    sid = http.post("/jam/start", data={"chunk_seconds": "0.08", "seed": str(seed),
                                        "styles": "techno"}).json()["session_id"]
    chunk = http.get("/jam/next", params={"session_id": sid}).json()["chunk"]
    http.post("/jam/stop", json={"session_id": sid})
    audio, _ = sf.read(io.BytesIO(base64.b64decode(chunk["audio_base64"])), dtype="int16")
    return audio


def model_of(http) -> dict:
    return http.get("/model/status").json()["variants"]["tiny"]["model"]


def test_checkpoint_listing(http, finetunes, bad_repos):
    listing = http.get("/model/checkpoints", params={"repo_id": str(finetunes["a"])}).json()
    assert listing["steps"] == [100] and listing["latest"] == 100
    assert listing["steering_assets"] == {"mean": True, "centroids": True}
    assert http.get("/model/checkpoints",
                    params={"repo_id": str(bad_repos["v1"])}).json()["v1_archives"] == [1863001]
    r = http.get("/model/checkpoints", params={"repo_id": "/no/such/dir"})
    assert r.status_code in (400, 503) and r.json()["error"].startswith("repo_id:")
    r = http.get("/model/checkpoints", params={"repo_id": "someone/repo", "revision": "a..b"})
    assert r.status_code == 422 and r.json()["error"] == (
        "revision: 'a..b' is not a branch, tag or commit id (it has '..', '@{' or '//')")
    r = http.post("/model/assets/load", json={"repo_id": str(finetunes["a"]), "revision": "v1"})
    assert r.status_code == 400 and "is a local directory, which has no revision 'v1'" in (
        r.json()["error"]), r.text


def test_dry_run_checks_without_switching(http, finetunes):
    before = model_of(http)
    r = http.post("/model/select", json={"repo_id": str(finetunes["a"]), "step": 100,
                                         "dry_run": True})
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["dry_run"] and report["same_architecture"]
    assert report["checkpoint"] == "checkpoint_100.safetensors"
    assert model_of(http) == before


def test_bad_selections_name_the_field_and_change_nothing(http, finetunes, bad_repos):
    before = model_of(http)
    cases = [
        ({"ckpt_repo": str(bad_repos["v1"]), "ckpt_step": 1863001}, 400, "Magenta RT 2"),
        ({"ckpt_repo": str(bad_repos["v1"])}, 400, "Magenta RT v1"),
        ({"ckpt_repo": str(finetunes["a"]), "ckpt_step": 999}, 400, "ckpt_step:"),
        ({"ckpt_repo": str(bad_repos["broken"]), "ckpt_step": 400}, 400, "not a readable"),
        ({"ckpt_repo": str(finetunes["a"]) + "-gone"}, 400,
         f"ckpt_repo: no such local directory: {finetunes['a']}-gone"),
        # a tiny checkpoint does not fit mrt2_small: named tensor, the size in the message
        ({"ckpt_repo": str(finetunes["a"]), "ckpt_step": 100, "size": "small",
          "dry_run": True}, 400, "mrt2_small"),
        ({"ckpt_repo": "a", "repo_id": "b"}, 422, "ckpt_repo and repo_id"),
        ({"ckpt_repo": str(finetunes["a"]), "size": "huge"}, 422, "size: unknown model size"),
        ({"ckpt_repo": str(finetunes["a"]), "ckpt_stp": 5}, 422, "ckpt_stp"),
        ({"ckpt_step": "latest"}, 400, "ckpt_step: 'latest' needs ckpt_repo"),
        ({"variant": "nope"}, 400, "variant:"),
        # a revision that cannot be a branch, tag or commit (was stored as the selection)
        ({"revision": "\x00"}, 422, "revision: '\\x00' is not a branch, tag or commit id "
                                     "(it has a space or control character)"),
        # and one a local directory cannot have (was ignored, and stored)
        ({"ckpt_repo": str(finetunes["a"]), "revision": "main", "dry_run": True}, 400,
         f"ckpt_repo: {finetunes['a']} is a local directory, which has no revision 'main'"),
    ]
    for body, status, text in cases:
        r = http.post("/model/select", json=body)
        assert r.status_code == status, (body, r.text)
        assert text in r.json()["error"], (body, r.json()["error"])
    assert model_of(http) == before
    # a check of the whole request names its fields itself, with nothing of pydantic's
    r = http.post("/model/select", json={"ckpt_repo": "a", "repo_id": "b"})
    assert r.json()["error"].startswith("ckpt_repo and repo_id name the same thing"), r.text
    r = http.post("/model/select", json={"ckpt_step": -1})
    assert r.json()["error"] == "ckpt_step: must be >= 0", r.text
    # one reason for a field of two forms (was "ckpt_step.int: ...; ckpt_step.literal[...")
    r = http.post("/model/select", json={"ckpt_step": 1e20})
    assert r.json()["error"] == (
        "ckpt_step: must be a checkpoint step (an integer) or 'latest', got 1e+20"), r.text
    # true is no step (pydantic's lax mode read it as step 1)
    r = http.post("/model/select", json={"ckpt_step": True, "dry_run": True})
    assert r.json()["error"] == (
        "ckpt_step: must be a checkpoint step (an integer) or 'latest', got True"), r.text
    # the prototype's names are the ones named back to a client that sent them (the
    # generator's checks and pydantic's both answered "ckpt_repo"/"ckpt_step"), and the
    # documented ones to one that sent those (a missing repo for 'latest' was "repo_id")
    gone = f"{finetunes['a']}-gone"
    for body, status, error in [
        ({"step": True}, 422, "step: must be a checkpoint step (an integer) or 'latest', "
                              "got True"),
        ({"step": -1}, 422, "step: must be >= 0"),
        ({"repo_id": ""}, 422, "repo_id: String should have at least 1 character"),
        ({"repo_id": gone}, 400, f"repo_id: no such local directory: {gone}"),
        ({"repo_id": str(finetunes["a"]), "step": 999}, 400, "step: "),
        ({"repo_id": gone, "step": "latest"}, 400, "repo_id: "),
        ({"ckpt_repo": gone, "ckpt_step": "latest"}, 400, "ckpt_repo: "),
    ]:
        r = http.post("/model/select", json=body | {"dry_run": True})
        assert r.status_code == status and r.json()["error"].startswith(error), (body, r.text)
    r = http.post("/model/assets/load", json={"assets_repo_id": gone})
    assert r.status_code == 400 and r.json()["error"].startswith("assets_repo_id: "), r.text
    # a body that is not a JSON object is the body's fault, named as such
    r = http.post("/model/select", content=b"garbage", headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    assert r.json()["error"] == "body: not valid JSON (Expecting value at character 0)", r.text
    r = http.post("/model/select", json=[1, 2])
    assert r.status_code == 422 and r.json()["error"].startswith("body: Input should be a valid "
                                                                 "dictionary"), r.text


def test_corrupt_checkpoint_rolls_back(http, bad_repos):
    before = model_of(http)
    r = http.post("/model/select", json={"ckpt_repo": str(bad_repos["broken"]),
                                         "ckpt_step": 300})
    assert r.status_code == 400 and "ckpt_step:" in r.json()["error"]
    assert "checkpoint_300.safetensors" in r.json()["error"]
    status = http.get("/model/status").json()["variants"]["tiny"]
    assert status["switch"]["state"] == "failed"
    assert status["switch"]["still_serving"] == before
    assert status["model"] == before and status["state"] == "ready"


def test_hot_swap_keeps_a_live_session_streaming_on_new_weights(http, core, finetunes, store):
    # from another model than the one swapped to, whatever the tests before selected
    r = http.post("/model/select", json={"ckpt_repo": str(finetunes["b"]), "ckpt_step": 200})
    assert r.status_code == 200, r.text
    generation = r.json()["generation"]
    old_audio = first_chunk_audio(http, seed=7)
    sid = http.post("/jam/start", data={"chunk_seconds": "0.08", "seed": "3"}).json()[
        "session_id"]
    chunks = [http.get("/jam/next", params={"session_id": sid}).json()["chunk"]
              for _ in range(3)]
    # the prototype's keys
    r = http.post("/model/select", json={"repo_id": str(finetunes["a"]), "step": 100,
                                         "prewarm": True})
    assert r.status_code == 200, r.text
    result = r.json()
    assert result["state"] == "serving" and result["sessions_kept"] == 1
    assert result["sessions_ended"] == 0 and result["generation"] == generation + 1
    chunks += [http.get("/jam/next", params={"session_id": sid}).json()["chunk"]
               for _ in range(3)]
    assert [c["index"] for c in chunks] == list(range(6))
    frames = [c["metadata"]["first_frame"] for c in chunks]
    assert frames == [2 * i for i in range(6)]  # no frame lost across the swap
    http.post("/jam/stop", json={"session_id": sid})
    assert model_of(http) == {"size": "tiny", "repo_id": str(finetunes["a"]), "step": 100,
                              "revision": None, "assets_repo_id": None}
    # new weights: the same seed now plays something else
    assert not np.array_equal(first_chunk_audio(http, seed=7), old_audio)
    assert store.get("tiny").selection.step == 100


def test_latest_step_and_the_documented_keys(http, finetunes):
    r = http.post("/model/select", json={"ckpt_repo": str(finetunes["b"]),
                                         "ckpt_step": "latest", "prewarm": False})
    assert r.status_code == 202 and r.json()["step"] == 200
    deadline = time.monotonic() + 120
    while (switch := http.get("/model/status").json()["variants"]["tiny"]["switch"])[
            "state"] != "done":
        assert time.monotonic() < deadline, switch
        time.sleep(0.2)
    assert model_of(http)["step"] == 200


def test_steering_assets_load_from_another_repo(http, finetunes):
    r = http.post("/model/assets/load", json={"repo_id": str(finetunes["a"])})
    assert r.status_code == 200 and r.json()["steering_assets"]["centroids"] == 3
    assets = http.get("/model/assets/status").json()["variants"]["tiny"]
    assert assets["assets_repo_id"] == str(finetunes["a"])
    r = http.post("/model/assets/load", json={"repo_id": str(finetunes["a"] / "checkpoints")})
    assert r.status_code == 400 and r.json()["error"].startswith("repo_id:")


def test_a_new_replica_serves_the_stored_selection_and_follows_changes(core, store, http,
                                                                         finetunes):
    """A second core on the same store is a restarted (or added) replica."""
    r = http.post("/model/select", json={"ckpt_repo": str(finetunes["b"]), "ckpt_step": 200})
    assert r.status_code == 200, r.text  # whatever the tests before this one selected
    selected = store.get("tiny")
    assert selected.selection.step == 200
    replica = GeneratorCore("tiny", max_sessions=1, buckets=(1,), store=store,
                            selection_poll_seconds=0.2)
    try:
        wait_until_ready(replica)
        assert replica.selection == selected.selection
        assert replica.generation == selected.generation
        # a switch made on the first replica reaches this one
        r = http.post("/model/select", json={"ckpt_repo": str(finetunes["a"]),
                                             "ckpt_step": 100})
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 120
        while replica.selection.step != 100:
            assert time.monotonic() < deadline, replica.switch
            time.sleep(0.2)
        assert replica.generation == core.generation
    finally:
        replica.shutdown()


def test_a_changed_boot_default_wins_over_an_old_selection(tmp_path):
    store = FileSelectionStore(tmp_path)
    old_boot = ModelSelection("tiny", "/old/boot", None)
    store.put("tiny", SelectionRecord(ModelSelection("tiny", "/picked", 5), old_boot, 3))
    assert stored_for_boot(store, "tiny", old_boot).selection.repo == "/picked"
    assert stored_for_boot(store, "tiny", ModelSelection("tiny", "/new/boot", None)) is None
    assert stored_for_boot(store, "other", old_boot) is None


def test_ab_split_is_sticky_and_follows_the_weights():
    split = ABSplit({"a": 3, "b": 1}, ["a", "b", "c"])
    ids = [f"client-{i}" for i in range(4000)]
    first = [split.assign(c) for c in ids]
    assert first == [split.assign(c) for c in ids]  # sticky
    assert ABSplit({"b": 1, "a": 3}, ["a", "b"]).assign("client-7") == first[7]
    share = first.count("a") / len(first)
    assert 0.72 < share < 0.78  # sha256 spreads ids evenly; fixed ids, so not flaky
    for weights, text in [({"x": 1}, "'x' is not a served variant"),
                          ({"a": -1}, "must be >= 0"), ({"a": 0}, "must not all be zero"),
                          ({}, "at least one")]:
        with pytest.raises(ValueError, match=text):
            ABSplit(weights, ["a", "b"])


def test_boot_defaults_come_from_the_environment():
    config = AppConfig(variants=[{"name": "main", "variant": "tiny"}, {"name": "other"}],
                       default_variant="main")
    apply_boot_env(config, {"MRT_CKPT_REPO": "thepatch/ft", "MRT_CKPT_STEP": "1863001",
                            "MRT_SIZE": "large"})
    main = config.variants[0]
    assert (main.repo, main.step, main.model_variant) == ("thepatch/ft", 1863001, "mrt2_base")
    assert config.variants[1].repo is None
    with pytest.raises(ValueError, match="MRT_CKPT_STEP"):
        apply_boot_env(config, {"MRT_CKPT_STEP": "last"})
    with pytest.raises(ValueError, match="size: unknown model size"):
        apply_boot_env(config, {"MRT_SIZE": "huge"})


def test_metrics_export_failures_never_stop_counting():
    from serve_app.metrics import GeneratorMetrics

    class BrokenExporter:
        def record(self, name, value):
            raise RuntimeError("exporter down")

    metrics = GeneratorMetrics(BrokenExporter())
    metrics.record("mrt_frames", 8)
    metrics.record("mrt_frames", 0)
    metrics.record("mrt_step_ms", 20.0)
    metrics.record("mrt_sessions", 3)
    assert metrics.snapshot()["mrt_device_memory_gb"] is None  # never set: not made up
    metrics.record("mrt_device_memory_gb", 5.25)
    snap = metrics.snapshot()
    assert snap["mrt_frames"] == 8 and snap["mrt_step_ms_mean"] == 20.0
    assert snap["mrt_sessions"] == 3 and snap["mrt_device_memory_gb"] == 5.25


def test_histograms_keep_prometheus_cumulative_buckets():
    """/health's step-time histogram: two snapshots' difference is one benchmark run."""
    from serve_app.metrics import GeneratorMetrics

    metrics = GeneratorMetrics()
    for ms in (3.0, 40.0, 41.0):
        metrics.record("mrt_step_ms", ms)
    snap = metrics.snapshot()
    le = snap["mrt_step_ms_le"]
    assert (le["5"], le["20"], le["40"], le["80"], le["+Inf"]) == (1, 1, 2, 3, 3)
    assert snap["mrt_step_ms_sum"] == 84.0 and snap["mrt_step_ms_mean"] == 28.0
    assert snap["mrt_chunk_latency_ms_le"]["+Inf"] == 0
