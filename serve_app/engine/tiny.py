"""The `tiny` variant's repository: random, deterministic weights in the Hub layout.

Written by `scripts/make_tiny_checkpoint.py`, and on first use when absent, so the
whole stack (loader included) runs offline exactly as it would on a real repo.
"""

from __future__ import annotations

import logging
import os
import pathlib

import numpy as np
from filelock import FileLock

from .. import checkpoints
from ..logs import PROGRESS_LOGGER
from . import codec, compile_cache, weights
from .model import build_sampler, random_params
from .variants import STYLE_EMBEDDING_DIM, get_variant

log = logging.getLogger(__name__)
progress = logging.getLogger(PROGRESS_LOGGER)

NUM_CENTROIDS = 3
FINETUNE_SEED = 1  # a stand-in finetune's weights: not the default repo's (seed 0)


def default_tiny_repo() -> pathlib.Path:
    root = os.environ.get("MRT_TINY_REPO")
    if root:
        return pathlib.Path(root).expanduser()
    cache = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache"))
    return cache / "mrt-serve" / "tiny-repo"


def _fill_zero_matrices(params: dict, seed: int) -> dict:
    """Upstream zero-initialises the MusicCoCa dequantizer, so a freshly initialised
    model ignores style tokens. Trained weights do not; fill such matrices with
    unit-variance values so that, as in the trained model, a style change steers the
    very next frame (tests/test_engine.py relies on it)."""
    rng = np.random.default_rng(seed)
    flat = weights.flatten(params)
    for key, value in flat.items():
        value = np.asarray(value)
        if value.ndim >= 2 and not value.any():
            flat[key] = rng.standard_normal(value.shape).astype(value.dtype)
    return weights.unflatten(flat)


def write_tiny_repo(out: pathlib.Path, *, seed: int = 0, step: int | None = None) -> pathlib.Path:
    """Writes checkpoint, codec encoder and steering assets; returns the checkpoint path.
    Initialising them is two XLA compiles (25-30 s on 2 cores, the same for every seed
    and step), so they go through the compilation cache as the engine's do."""
    compile_cache.enable()
    variant = get_variant("tiny")
    sampler = build_sampler(variant)
    name = checkpoints.checkpoint_candidates(variant.checkpoint_file, step)[0]
    ckpt = out / name
    weights.save(_fill_zero_matrices(random_params(sampler, seed), seed), ckpt)
    weights.save(codec.random_encoder_params(variant, seed), out / checkpoints.ENCODER_FILE)
    rng = np.random.default_rng(seed)
    np.save(out / checkpoints.MEAN_FILE, rng.standard_normal(STYLE_EMBEDDING_DIM, np.float32))
    np.save(
        out / checkpoints.CENTROIDS_FILE,
        rng.standard_normal((NUM_CENTROIDS, STYLE_EMBEDDING_DIM), np.float32),
    )
    log.info("wrote tiny repo %s (seed %d)", out, seed)
    return ckpt


def ensure_tiny_repo(path: pathlib.Path | None = None) -> pathlib.Path:
    """The tiny repo directory, created (once, even across processes) if absent."""
    path = path or default_tiny_repo()
    path.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path / ".lock")):
        if not (path / get_variant("tiny").checkpoint_file).exists():
            write_tiny_repo(path)
    return path


def write_named_repos(wanted: list[tuple[pathlib.Path, int | None]]) -> None:
    """Writes each (directory, step) a config's `tiny` variants name and lack
    (`AppConfig.tiny_repos_to_write`) as a finetune of seed `FINETUNE_SEED`: a stand-in
    for the A/B demo, so configs/tiny.yaml serves however it is started. Written beside
    and then renamed, so a write cut short leaves no directory that looks complete."""
    for path, step in wanted:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path.parent / f".{path.name}.lock")):
            if path.exists():  # another process wrote it meanwhile
                continue
            progress.info("writing the tiny finetune the config names: %s (step %s; once, "
                          "about 30 s on 2 cores) ...", path, step)
            partial = path.with_name(f".{path.name}.partial")
            partial.mkdir(exist_ok=True)
            write_tiny_repo(partial, seed=FINETUNE_SEED, step=step)
            partial.rename(path)
