"""Switching a generator to other weights: check everything first, load beside the old
model, and leave the hand-over (between two steps) to the generator.

`validate` touches nothing the generator uses: it resolves the files (downloading
them into the cache) and checks every tensor's name and shape against the target
architecture from the file header. `prepare` then loads the new weights next to
the old ones. With the same architecture only the parameters change and the
compiled steps are reused; with another one a new engine is built and compiled
for every batch bucket before any session sees it. Any failure leaves the old
model serving.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable

from . import checkpoints
from .engine import BatchedEngine, LoadedModel, load_model, weights
from .engine.loader import repo_for, resolve_files
from .engine.model import build_sampler, expected_param_shapes
from .engine.variants import get_variant
from .errors import BadRequest, Unavailable
from .loop_encoder import LoopEncoder, NoLoopEncoder, build_loop_encoder
from .selection import ModelSelection

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Candidate:
    """A selection whose files exist and fit its architecture."""

    selection: ModelSelection
    files: checkpoints.ModelFiles
    same_architecture: bool

    def report(self) -> dict:
        return {
            **self.selection.describe(),
            "checkpoint": self.files.checkpoint.name,
            "same_architecture": self.same_architecture,
            "steering_assets": self.files.steering.describe(),
            "loop_encoder": self.files.encoder is not None,
        }


@dataclasses.dataclass
class Prepared:
    """A loaded model ready to swap in; `engine` only when the architecture changes."""

    candidate: Candidate
    loaded: LoadedModel
    engine: BatchedEngine | None
    encoder: LoopEncoder | NoLoopEncoder
    seconds: float


def validate(selection: ModelSelection, current: LoadedModel) -> Candidate:
    """Raises BadRequest naming the field at fault, or Unavailable when the Hub cannot be
    reached; otherwise the files are in the cache and fit the architecture."""
    try:
        variant = get_variant(selection.variant)
    except ValueError as e:
        raise BadRequest(f"size: {e}") from e
    field = "ckpt_step" if selection.step is not None else "ckpt_repo"
    same = variant.name == current.variant.name
    with _named(field):
        # the weights first: a checkpoint of the wrong size fails before any download
        repo = repo_for(variant, selection.repo)
        source = checkpoints.Repo(repo, revision=selection.revision)
        checkpoint = checkpoints.find_checkpoint(source, variant.checkpoint_file, selection.step)
        sampler = current.model.sampler if same else build_sampler(variant)
        try:
            weights.check(checkpoint, expected_param_shapes(sampler))
        except weights.CheckpointError as e:
            raise BadRequest(f"{field}: {e} (does it fit size {variant.name}?)") from e
        files = resolve_files(variant, repo=repo, step=selection.step,
                              revision=selection.revision, assets_repo=selection.assets_repo,
                              checkpoint=checkpoint)
    return Candidate(selection, files, same)


@contextlib.contextmanager
def _named(field: str):
    """Checkpoint problems as API errors naming `field` (503 when the Hub is unreachable)."""
    try:
        yield
    except checkpoints.V1Checkpoint as e:
        raise BadRequest(str(e)) from e
    except checkpoints.CheckpointNotFound as e:
        if "cannot be reached" in str(e):
            raise Unavailable(f"{field}: {e}") from e
        raise BadRequest(f"{field}: {e}") from e
    except ValueError as e:  # unusable steering assets, names leaving the repo
        raise BadRequest(f"{field}: {e}") from e


def prepare(
    candidate: Candidate,
    current: LoadedModel,
    *,
    name: str,
    compute_dtype: str,
    make_engine: Callable[[LoadedModel], BatchedEngine],
    keep_steering: bool = False,
) -> Prepared:
    """Loads the candidate beside `current` (which keeps serving meanwhile)."""
    t0 = time.perf_counter()
    files = candidate.files
    steering = current.steering if keep_steering else files.steering
    try:
        if candidate.same_architecture:
            params = weights.load(files.checkpoint, expected_param_shapes(current.model.sampler))
            loaded = dataclasses.replace(current, model=current.model.with_params(params),
                                         steering=steering, files=files,
                                         random_weights_seed=None)
            engine = None
        else:
            loaded = load_model(candidate.selection.variant, compute_dtype=compute_dtype,
                                files=files)
            loaded.steering = steering
            engine = make_engine(loaded)
    except weights.CheckpointError as e:
        raise BadRequest(f"ckpt_step: {e}") from e
    encoder = build_loop_encoder(loaded, name)
    seconds = time.perf_counter() - t0
    log.info("generator %s: prepared %s in %.1fs", name, files.checkpoint.name, seconds)
    return Prepared(candidate, loaded, engine, encoder, seconds)
