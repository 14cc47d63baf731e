"""Weights and repos: the real loader on files written by our own tiny script."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy
import yaml

from serve_app import checkpoints, logs
from serve_app.config import load_app_config
from serve_app.engine import load_model, weights
from serve_app.engine.model import build_sampler, expected_param_shapes
from serve_app.engine.tiny import _fill_zero_matrices, random_params
from serve_app.engine.variants import FRAME_SAMPLES, get_variant

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_tiny_repo_has_the_hub_layout(tiny_repo):
    files = checkpoints.Repo(str(tiny_repo)).list_files()
    for name in ("checkpoints/tiny.safetensors", checkpoints.ENCODER_FILE,
                 checkpoints.MEAN_FILE, checkpoints.CENTROIDS_FILE):
        assert name in files
    assert np.load(tiny_repo / checkpoints.CENTROIDS_FILE).shape == (3, 768)


def test_a_local_listing_reads_only_where_the_hub_layout_puts_files(tmp_path):
    """Naming a big directory (`/`, say) costs two directory reads, not a disk walk."""
    for name in ("checkpoint_5.safetensors", "checkpoints/checkpoint_7.safetensors",
                 checkpoints.ENCODER_FILE, "deep/er/checkpoint_9.safetensors",
                 "checkpoints/old/checkpoint_11.safetensors"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert checkpoints.Repo(str(tmp_path)).list_files() == [
        "checkpoint_5.safetensors", "checkpoints/checkpoint_7.safetensors",
        checkpoints.ENCODER_FILE]
    assert checkpoints.list_checkpoints(str(tmp_path))["steps"] == [5, 7]


def test_checkpoint_round_trip_through_the_real_loader(tiny):
    expected = _fill_zero_matrices(random_params(tiny.model.sampler, 0), 0)
    got, want = weights.flatten(tiny.model.restored_params()), weights.flatten(expected)
    assert got.keys() == want.keys() and len(got) > 50
    for key in want:
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]), err_msg=key)
    assert tiny.files.checkpoint.name == "tiny.safetensors"
    assert tiny.steering.num_centroids == 3


@pytest.fixture
def broken_copy(tiny_repo, tmp_path):
    def make(edit):
        repo = tmp_path / "repo"
        shutil.copytree(tiny_repo, repo)
        path = repo / "checkpoints/tiny.safetensors"
        tensors = safetensors.numpy.load_file(str(path))
        edit(tensors)
        safetensors.numpy.save_file(tensors, str(path))
        return repo
    return make


def test_missing_tensor_is_named(broken_copy):
    key = "params/depthformer/decoder/depth_body/final_ln/scale"
    repo = broken_copy(lambda t: t.pop(key))
    with pytest.raises(weights.CheckpointError, match=f"missing tensor '{key}'"):
        load_model("tiny", repo=str(repo))


def test_misshapen_tensor_is_named_with_both_shapes(broken_copy):
    key = "params/soundstream/quantizer/embedding"
    repo = broken_copy(lambda t: t.__setitem__(key, np.zeros((12, 1024, 8), np.float32)))
    with pytest.raises(
        weights.CheckpointError,
        match=rf"tensor '{key}' has shape \(12, 1024, 8\), the model expects \(12, 1024, 16\)",
    ):
        load_model("tiny", repo=str(repo))


def test_unreadable_file_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"not a safetensors file")
    sampler = build_sampler(get_variant("tiny"))
    with pytest.raises(weights.CheckpointError, match="not a readable safetensors file"):
        weights.load(path, expected_param_shapes(sampler))


def test_missing_files_say_what_and_where(tmp_path):
    with pytest.raises(checkpoints.CheckpointNotFound) as err:
        checkpoints.resolve(str(tmp_path), "checkpoints/tiny.safetensors", need_musiccoca=False)
    assert "checkpoints/tiny.safetensors" in str(err.value) and str(tmp_path) in str(err.value)
    with pytest.raises(checkpoints.CheckpointNotFound, match="checkpoint step 42"):
        checkpoints.resolve(str(tmp_path), "x.safetensors", step=42, need_musiccoca=False)


def test_hub_repo_offline_and_uncached_is_one_clear_error(tmp_path, monkeypatch):
    # imported before the environment changes: imported after, huggingface_hub would read
    # HF_HUB_OFFLINE=1 as its own default, and stay offline for the tests after this one
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(checkpoints.CheckpointNotFound) as err:
        checkpoints.resolve("google/magenta-realtime-2", "checkpoints/mrt2_small.safetensors")
    message = str(err.value)
    assert "checkpoints/mrt2_small.safetensors" in message
    assert "google/magenta-realtime-2" in message and "cannot be reached" in message


def test_names_cannot_leave_the_repo(tiny_repo):
    repo = checkpoints.Repo(str(tiny_repo))
    for name in ("../secrets", "/etc/passwd", "a/../../b"):
        with pytest.raises(ValueError, match="would leave the repository"):
            repo.fetch(name)


def test_step_listing_and_v1_archives():
    files = ["checkpoint_10.safetensors", "checkpoints/checkpoint_2.safetensors",
             "checkpoints/mrt2_small.safetensors", "checkpoint_1863001.tgz"]
    assert checkpoints.list_steps(files) == [2, 10]
    assert checkpoints.v1_steps(files) == [1863001]
    assert checkpoints.v1_steps(files[:3]) == []
    # a step only present as a v1 archive is refused, a safetensors step is not
    with pytest.raises(checkpoints.V1Checkpoint, match=r"Magenta RT v1.*runs Magenta RT 2"):
        checkpoints.refuse_v1("r", files, 1863001)
    checkpoints.refuse_v1("r", files, 10)
    # a repo of nothing but v1 archives is refused when no step is named
    with pytest.raises(checkpoints.V1Checkpoint, match=r"checkpoint_<step>\.tgz"):
        checkpoints.refuse_v1("r", ["checkpoint_5.tgz", "mean_style_embed.npy"], None)


def test_checkpoint_listing_of_a_local_repo(tiny_repo, tmp_path):
    shutil.copytree(tiny_repo, tmp_path, dirs_exist_ok=True)
    for step in (300, 100):
        shutil.copy(tiny_repo / "checkpoints/tiny.safetensors",
                    tmp_path / f"checkpoint_{step}.safetensors")
    (tmp_path / "checkpoint_7.tgz").write_bytes(b"not really")
    listing = checkpoints.list_checkpoints(str(tmp_path))
    assert listing["steps"] == [100, 300] and listing["latest"] == 300
    assert listing["v1_archives"] == [7]
    assert listing["steering_assets"] == {"mean": True, "centroids": True}


def test_weights_check_reads_headers_only(tiny, tiny_repo, tmp_path):
    from serve_app.engine import weights
    from serve_app.engine.model import expected_param_shapes

    expected = expected_param_shapes(tiny.model.sampler)
    ckpt = tiny_repo / "checkpoints/tiny.safetensors"
    report = weights.check(ckpt, expected)
    assert report["tensors"] == len(weights.flatten(expected))
    # header intact, data cut short: the check passes, loading names the problem
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    with pytest.raises(weights.CheckpointError, match=r"cut\.safetensors"):
        weights.load(cut, expected)


def test_make_tiny_checkpoint_script_writes_a_finetune_step(tmp_path, tiny_repo):
    """Its two initialisers come from the compilation cache: the session's tiny repo
    compiled the same ones (for another seed). JAX_LOG_COMPILES logs each hit."""
    out = tmp_path / "ft"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts/make_tiny_checkpoint.py"),
         "--out", str(out), "--seed", "3", "--step", "1200"],
        check=True, capture_output=True, text=True, env={**os.environ, "JAX_LOG_COMPILES": "1"},
    )
    assert done.stderr.count("Persistent compilation cache hit for 'jit__lambda'") == 2, \
        done.stderr[-3000:]
    assert (out / "checkpoint_1200.safetensors").is_file()
    loaded = load_model("tiny", repo=str(out), step=1200)
    assert loaded.files.step == 1200
    assert checkpoints.list_steps(checkpoints.Repo(str(out)).list_files()) == [1200]


def test_audio_encoder_turns_audio_into_codes(tiny):
    encoder = tiny.audio_encoder()
    t = np.arange(4 * FRAME_SAMPLES) / 48000
    audio = np.stack([np.sin(2 * np.pi * 220 * t), np.sin(2 * np.pi * 330 * t)], -1) * 0.5
    codes = encoder.encode(audio.astype(np.float32))
    assert codes.shape == (4, 12) and codes.dtype == np.int32
    assert ((codes >= 0) & (codes < 1024)).all()
    np.testing.assert_array_equal(codes, encoder.encode(audio.astype(np.float32)))
    with pytest.raises(ValueError, match=r"audio: expected \[k\*1920, 2\]"):
        encoder.encode(np.zeros((1000, 2), np.float32))


def test_a_hub_repo_downloads_into_the_cache_and_says_so(tiny_repo, tmp_path, monkeypatch,
                                                         caplog):
    """The real download path against a Hub endpoint on localhost serving the suite's tiny
    repo: huggingface_hub's cache, a progress line when a file starts and when it ends (a
    replica's console shows them, serve_app/downloads.py), none for a cached file."""
    import huggingface_hub.constants as hc

    from .fake_hub import fake_hub

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with fake_hub(tiny_repo) as endpoint, caplog.at_level("INFO", logger=logs.PROGRESS_LOGGER):
        # what HF_ENDPOINT sets, read by huggingface_hub when it is imported
        monkeypatch.setattr(hc, "ENDPOINT", endpoint)
        monkeypatch.setattr(hc, "HUGGINGFACE_CO_URL_TEMPLATE",
                            endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        loaded = load_model("tiny", repo="someone/tiny-finetune")
        weights = loaded.files.checkpoint
        assert weights.is_relative_to(tmp_path / "hub")
        assert weights.read_bytes() == (tiny_repo / "checkpoints/tiny.safetensors").read_bytes()
        assert re.search(r"downloading checkpoints/tiny\.safetensors \([\d.]+MB\) from Hub "
                         r"repo 'someone/tiny-finetune'", caplog.text), caplog.text
        assert re.search(r"downloaded checkpoints/tiny\.safetensors \([\d.]+MB\) in [\d.]+ s",
                         caplog.text), caplog.text
        assert f"downloaded {checkpoints.MEAN_FILE}" in caplog.text
        caplog.clear()
        repo = checkpoints.Repo("someone/tiny-finetune")
        assert repo.fetch("checkpoints/tiny.safetensors") == weights  # cached: no line
        assert repo.fetch("checkpoint_7.safetensors") is None  # not in the repo
        assert "download" not in caplog.text


def test_a_long_download_says_how_far_it_got(monkeypatch, caplog):
    from serve_app import downloads

    monkeypatch.setattr(downloads, "EVERY_S", 0.0)
    with caplog.at_level("INFO", logger=logs.PROGRESS_LOGGER):
        bar = downloads.DownloadProgress(total=4_000_000, unit="B", unit_scale=True,
                                         mininterval=0, name="checkpoints/x.safetensors")
        bar.update(1_000_000)
        bar.close()
    assert caplog.messages == [
        "downloading checkpoints/x.safetensors (4.00MB)",
        "downloading checkpoints/x.safetensors: 1.00MB of 4.00MB (25%)",
        "download of checkpoints/x.safetensors stopped at 1.00MB of 4.00MB",
    ]


def test_benchmark_weights_have_the_checkpoints_tree_without_running_its_initialisers():
    """`weights.random_like`: every tensor a checkpoint must hold, its shape and dtype, on
    the host, small and not constant, the same for a seed and another for another."""
    expected = expected_param_shapes(build_sampler(get_variant("tiny")))
    got = weights.random_like(expected, seed=3)
    flat, want = weights.flatten(got), weights.flatten(expected)
    assert flat.keys() == want.keys()
    for key, spec in want.items():
        assert isinstance(flat[key], np.ndarray), key
        assert flat[key].shape == tuple(spec.shape) and flat[key].dtype == spec.dtype, key
    values = np.concatenate([v.ravel() for v in flat.values()])
    assert values.size > weights.RANDOM_BLOCK  # longer than its block: it repeats
    assert 0 < np.abs(values).max() < 0.2 and values.std() > 0.01
    again = weights.flatten(weights.random_like(expected, seed=3))
    other = weights.flatten(weights.random_like(expected, seed=4))
    assert all(np.array_equal(flat[k], again[k]) for k in want)
    assert not all(np.array_equal(flat[k], other[k]) for k in want)


def test_a_config_s_missing_tiny_finetune_is_written_before_serving(tmp_path, tiny_repo,
                                                                   finetunes):
    """What scripts/serve runs before `serve run` (and `mrt-serve local` and
    `bench_local.py --ray` do in-process): the `write_if_missing` repos a config's `tiny`
    variants lack are written, as seed 1 (so the same weights as the suite's finetune A,
    seed 1 at step 100); repos that exist, and missing ones not so marked, are left alone."""
    named = tmp_path / "named" / "tiny-ft"
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"applications": [{"name": "mrt", "args": {"variants": [
        {"name": "tiny"},
        {"name": "there", "variant": "tiny", "repo": str(tiny_repo)},
        {"name": "tiny_ft", "variant": "tiny", "repo": str(named), "step": 100,
         "write_if_missing": True},
        {"name": "typo", "variant": "tiny", "repo": str(tmp_path / "not-asked-for")},
    ]}}]}))
    script = [sys.executable, str(ROOT / "scripts/make_tiny_checkpoint.py"),
              "--for-config", str(config)]
    done = subprocess.run(script, check=True, capture_output=True, text=True)
    assert f"writing the tiny finetune the config names: {named} (step 100" in done.stderr
    assert sorted(p.name for p in named.parent.iterdir()) == [".tiny-ft.lock", "tiny-ft"]
    ckpt = named / "checkpoint_100.safetensors"
    assert ckpt.read_bytes() == (finetunes["a"] / "checkpoint_100.safetensors").read_bytes()
    assert load_model("tiny", repo=str(named), step=100).files.step == 100
    written = ckpt.stat().st_mtime_ns
    again = subprocess.run(script, check=True, capture_output=True, text=True)
    assert "writing" not in again.stderr and ckpt.stat().st_mtime_ns == written
    assert not (tmp_path / "not-asked-for").exists()  # a typo stays an error to report
    args = {"variants": [{"name": "ft", "variant": "tiny", "repo": str(tmp_path / "nope"),
                          "write_if_missing": True}]}
    assert load_app_config(args, {}).tiny_repos_to_write() == [(tmp_path / "nope", None)]
    assert load_app_config({**args, "random_weights": True}, {}).tiny_repos_to_write() == []
    for entry in ({"name": "mrt2_small", "repo": "/x"}, {"name": "tiny"}):
        with pytest.raises(ValueError, match=r"write_if_missing: only a `tiny` variant's"):
            load_app_config({"variants": [{**entry, "write_if_missing": True}]}, {})


def test_a_local_path_that_is_not_there_is_named_as_such(tmp_path):
    missing = tmp_path / "no-such-repo"
    for repo in (str(missing), "./no-such-repo", "~/no-such-repo-of-mrt-serve"):
        with pytest.raises(checkpoints.CheckpointNotFound, match="no such local directory"):
            checkpoints.resolve(repo, "checkpoints/tiny.safetensors", need_musiccoca=False)
    with pytest.raises(checkpoints.CheckpointNotFound) as raised:
        checkpoints.Repo(str(missing))
    assert str(raised.value) == f"no such local directory: {missing}"


def test_a_revision_is_a_branch_tag_or_commit_of_a_hub_repo(tmp_path):
    commit = "0123456789abcdef" * 2 + "01234567"
    for good in ("main", "v1.0", "refs/pr/1", "release/2026-12", commit):
        assert checkpoints.check_revision(good) == good
    for bad, why in [("", None), ("a b", "a space or control character"),
                     ("x\x00", "a space or control character"), ("a:b", "one of ~ ^ :"),
                     ("../main", "'..'"), ("a@{1}", "'@{'"), ("a//b", "'//'"),
                     (".hidden", "a part that starts with '.'"), ("/main", "a '/' first"),
                     ("main/", "an end in '/'"), ("v1.", "an end in"), ("b.lock", "an end in")]:
        with pytest.raises(ValueError, match="is not a branch, tag or commit id") as raised:
            checkpoints.check_revision(bad)
        assert why is None or why in str(raised.value), (bad, str(raised.value))
    # a directory has no revisions: refused rather than ignored
    with pytest.raises(checkpoints.CheckpointNotFound,
                       match=f"{tmp_path} is a local directory, which has no revision 'main'"):
        checkpoints.Repo(str(tmp_path), revision="main")
    assert checkpoints.Repo("someone/repo", revision="main").revision == "main"
