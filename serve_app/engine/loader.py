"""Loading a servable model: resolve files, check and load weights, pick the style model."""

from __future__ import annotations

import dataclasses
import logging
import time

import jax

from .. import checkpoints
from ..styles import SteeringAssets, StyleModel
from . import weights
from .codec import AudioEncoder
from .model import StreamingModel, build_sampler, expected_param_shapes, random_params
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

    @property
    def variant(self) -> Variant:
        return self.model.variant

    def audio_encoder(self) -> AudioEncoder:
        if self.files is None or self.files.encoder is None:
            raise checkpoints.CheckpointNotFound(
                f"{checkpoints.ENCODER_FILE} is needed to encode audio input and was not found"
            )
        return AudioEncoder(self.variant, self.files.encoder, self.model.params)


def resolve_compute_dtype(variant: Variant, compute_dtype: str = "auto"):
    """`auto`: the model's own dtype (bfloat16) on accelerators, float32 on CPU.

    XLA's CPU backend emulates bfloat16 matmuls, so float32 is both faster and
    closer to the trained numerics there.
    """
    if compute_dtype == "auto":
        return COMPUTE_DTYPES["float32"] if jax.default_backend() == "cpu" else (
            variant.default_compute_dtype()
        )
    try:
        return COMPUTE_DTYPES[compute_dtype]
    except KeyError:
        raise ValueError(
            f"compute_dtype: choose auto or one of {sorted(COMPUTE_DTYPES)}, got {compute_dtype!r}"
        ) from None


def load_model(
    variant_name: str,
    *,
    repo: str | None = None,
    step: int | None = None,
    revision: str | None = None,
    compute_dtype: str = "auto",
    random_weights_seed: int | None = None,
) -> LoadedModel:
    """Loads a variant from its repo (`tiny`: the local tiny repo, made if absent).

    `random_weights_seed` skips files entirely (benchmarks: speed does not depend on
    weight values).
    """
    t0 = time.perf_counter()
    variant = get_variant(variant_name)
    sampler = build_sampler(variant, compute_dtype=resolve_compute_dtype(variant, compute_dtype))
    mock_style = variant.name == "tiny"
    if random_weights_seed is not None:
        params, files = random_params(sampler, random_weights_seed), None
        steering = SteeringAssets()
    else:
        if repo is None:
            repo = str(ensure_tiny_repo()) if mock_style else checkpoints.DEFAULT_REPO
        files = checkpoints.resolve(
            repo, variant.checkpoint_file, step=step, revision=revision,
            need_musiccoca=not mock_style,
        )
        params = weights.load(files.checkpoint, expected_param_shapes(sampler))
        steering = files.steering
    if mock_style or files is None:
        style = StyleModel.mock()
    else:
        style = StyleModel.from_resources(files.musiccoca_dir)
    seconds = time.perf_counter() - t0
    log.info("loaded %s in %.1fs", variant.name, seconds)
    return LoadedModel(StreamingModel(variant, sampler, params), style, steering, files, seconds)
