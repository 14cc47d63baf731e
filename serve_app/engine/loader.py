"""Loading a servable model: resolve files, check and load weights, pick the style model."""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import time

from .. import checkpoints
from ..styles import SteeringAssets, StyleModel
from . import compile_cache, weights
from .codec import AudioEncoder
from .device import on_cpu
from .model import StreamingModel, build_sampler, expected_param_shapes
from .tiny import ensure_tiny_repo
from .variants import COMPUTE_DTYPES, Variant, get_variant

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LoadedModel:
    """Everything a generator needs for one variant."""

    model: StreamingModel
    style: StyleModel
    steering: SteeringAssets
    files: checkpoints.ModelFiles | None
    load_seconds: float
    random_weights_seed: int | None = None

    @property
    def variant(self) -> Variant:
        return self.model.variant

    def audio_encoder(self) -> AudioEncoder:
        if self.random_weights_seed is not None:
            return AudioEncoder.random(self.variant, self.random_weights_seed,
                                       self.model.codebooks)
        if self.files is None or self.files.encoder is None:
            raise checkpoints.CheckpointNotFound(
                f"{checkpoints.ENCODER_FILE} is needed to encode audio input and was not found"
            )
        return AudioEncoder.from_file(self.variant, self.files.encoder, self.model.codebooks)


def resolve_compute_dtype(variant: Variant, compute_dtype: str = "auto"):
    """`auto`: the model's own dtype (bfloat16) on accelerators, float32 on CPU.

    XLA's CPU backend emulates bfloat16 matmuls, so float32 is both faster and
    closer to the trained numerics there.
    """
    if compute_dtype == "auto":
        return COMPUTE_DTYPES["float32"] if on_cpu() else (
            variant.default_compute_dtype()
        )
    try:
        return COMPUTE_DTYPES[compute_dtype]
    except KeyError:
        raise ValueError(
            f"compute_dtype: choose auto or one of {sorted(COMPUTE_DTYPES)}, got {compute_dtype!r}"
        ) from None


def resolve_files(
    variant: Variant,
    *,
    repo: str | None = None,
    step: int | None = None,
    revision: str | None = None,
    assets_repo: str | None = None,
    checkpoint: pathlib.Path | None = None,
) -> checkpoints.ModelFiles:
    """The files of a variant's weights (`tiny` with no repo: the local tiny repo, made
    if absent; others: the official Hub repo, which also lends finetune repos the codec
    encoder and MusicCoCa they lack). `tiny` has its own codec and a mock MusicCoCa."""
    tiny = variant.name == "tiny"
    return checkpoints.resolve(
        repo_for(variant, repo), variant.checkpoint_file, step=step, revision=revision,
        need_musiccoca=not tiny, assets_repo=assets_repo,
        base_repo=None if tiny else checkpoints.DEFAULT_REPO, checkpoint=checkpoint,
    )


def repo_for(variant: Variant, repo: str | None) -> str:
    if repo is not None:
        return repo
    return str(ensure_tiny_repo()) if variant.name == "tiny" else checkpoints.DEFAULT_REPO


def load_model(
    variant_name: str,
    *,
    repo: str | None = None,
    step: int | None = None,
    revision: str | None = None,
    assets_repo: str | None = None,
    compute_dtype: str = "auto",
    random_weights_seed: int | None = None,
    files: checkpoints.ModelFiles | None = None,
) -> LoadedModel:
    """Loads a variant from its repo (or from already resolved `files`).

    `random_weights_seed` skips files entirely (benchmarks: speed does not depend on
    weight values; `weights.random_like`).
    """
    t0 = time.perf_counter()
    compile_cache.enable()
    variant = get_variant(variant_name)
    sampler = build_sampler(variant, compute_dtype=resolve_compute_dtype(variant, compute_dtype))
    if random_weights_seed is not None:
        params = weights.random_like(expected_param_shapes(sampler), random_weights_seed)
        files = None
        steering = SteeringAssets()
    else:
        files = files or resolve_files(variant, repo=repo, step=step, revision=revision,
                                       assets_repo=assets_repo)
        params = weights.load(files.checkpoint, expected_param_shapes(sampler))
        steering = files.steering
    if variant.name == "tiny" or files is None:
        style = StyleModel.mock()
    else:
        style = StyleModel.from_resources(files.musiccoca_dir)
    seconds = time.perf_counter() - t0
    log.info("loaded %s in %.1fs", variant.name, seconds)
    return LoadedModel(StreamingModel(variant, sampler, params), style, steering, files, seconds,
                       random_weights_seed)
