"""Shared fixtures: one tiny repo written by our own script, one loaded tiny model.

Compiling a step costs seconds on 2 cores, so the model (and its jit caches) is
loaded once per session and shared; tests make their own engines and sessions.
"""

from __future__ import annotations

import os
import pathlib

import pytest

from serve_app import logs


@pytest.fixture(scope="session", autouse=True)
def compile_cache(tmp_path_factory) -> pathlib.Path:
    """One XLA compilation cache for the session, never the developer's ~/.cache: set
    before anything compiles, so this process, the scripts it runs and the Ray workers
    (started later, with this environment) all share it."""
    from serve_app.engine import compile_cache

    path = tmp_path_factory.mktemp("xla-cache")
    os.environ["MRT_COMPILE_CACHE"] = str(path)
    compile_cache.enable()
    return path


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory) -> pathlib.Path:
    from serve_app.engine.tiny import write_tiny_repo

    repo = tmp_path_factory.mktemp("tiny-repo")
    write_tiny_repo(repo, seed=0)
    os.environ["MRT_TINY_REPO"] = str(repo)  # `tiny` with no repo resolves here too
    return repo


@pytest.fixture(scope="session")
def tiny(tiny_repo):
    from serve_app.engine import load_model

    logs.configure()
    return load_model("tiny", repo=str(tiny_repo))


@pytest.fixture
def make_engine(tiny):
    from serve_app.engine import BatchedEngine

    def make(buckets=(1, 2, 4), **kwargs):
        return BatchedEngine(tiny.model, tiny.style, buckets=buckets, **kwargs)

    return make


@pytest.fixture(scope="session")
def serve_root():
    """One real Ray Serve instance for the whole test session."""
    from .serve_fixtures import ray_serve

    with ray_serve() as url:
        yield url


@pytest.fixture(scope="session")
def serve_base(serve_root, tiny_repo):
    """Our graph (tiny, CPU) on that instance, for every API test module; with two ingress
    replicas, as configs/serve.yaml has, so that a request may reach either."""
    from .serve_fixtures import deploy, tiny_config

    return deploy(serve_root, tiny_config(tiny_repo, ingress_replicas=2))


@pytest.fixture(scope="session")
def finetunes(tmp_path_factory) -> dict[str, pathlib.Path]:
    """Two `tiny` "finetunes" in local repos, made by our script as a user would:
    seed 1 at step 100 and seed 2 at step 200 (both scripts run at once)."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("finetunes")
    script = pathlib.Path(__file__).resolve().parents[1] / "scripts/make_tiny_checkpoint.py"
    repos = {"a": (root / "ft-a", 1, 100), "b": (root / "ft-b", 2, 200)}
    runs = [subprocess.Popen([sys.executable, str(script), "--out", str(out), "--seed",
                              str(seed), "--step", str(step)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
            for out, seed, step in repos.values()]
    for run in runs:
        output, _ = run.communicate(timeout=300)
        assert run.returncode == 0, output
    return {k: out for k, (out, _, _) in repos.items()}


@pytest.fixture(scope="session")
def broken_finetune(finetunes, tmp_path_factory) -> pathlib.Path:
    """Finetune A plus two bad steps: 300 truncated at half (header intact, data short)
    and 400 not a safetensors file at all."""
    import shutil

    repo = tmp_path_factory.mktemp("broken-ft")
    shutil.copytree(finetunes["a"], repo, dirs_exist_ok=True)
    good = (finetunes["a"] / "checkpoint_100.safetensors").read_bytes()
    (repo / "checkpoint_300.safetensors").write_bytes(good[: len(good) // 2])
    (repo / "checkpoint_400.safetensors").write_bytes(b"garbage")
    return repo
