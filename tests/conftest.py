"""Shared fixtures: one tiny repo written by our own script, one loaded tiny model.

Compiling a step costs seconds on 2 cores, so the model (and its jit caches) is
loaded once per session and shared; tests make their own engines and sessions.
"""

from __future__ import annotations

import os
import pathlib

import pytest

from serve_app import logs


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
def serve_base(tiny_repo):
    """One real Ray Serve instance of our graph (tiny, CPU) for every API test module."""
    from .serve_fixtures import running_serve, tiny_config

    with running_serve(tiny_config(tiny_repo)) as url:
        yield url
