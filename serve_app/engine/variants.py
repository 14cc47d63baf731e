"""Model variants: which depthformer and which codec make up each servable model.

`mrt2_small` and `mrt2_base` are the upstream model classes unchanged. `tiny` uses
the same classes with very small transformers and a very small SpectroStream codec,
keeping the frame geometry (48 kHz stereo, 1920 samples per 40 ms frame, 12 RVQ
levels of 1024 codes, the 144-token conditioning block) so every code path that
serves the real models is exercised by the tests on a 2-core CPU.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax.numpy as jnp
import sequence_layers.jax as sl
from magenta_rt.config import ModelSpec
from magenta_rt.jax import model as upstream_model
from magenta_rt.jax import spectrostream
from sequence_layers.jax import utils as sl_utils

from ..frames import (  # noqa: F401  (re-exported: the engine's geometry)
    CHANNELS,
    FRAME_SAMPLES,
    FRAMES_PER_SECOND,
    SAMPLE_RATE,
    STYLE_EMBEDDING_DIM,
)
from .catalog import (  # noqa: F401  (re-exported)
    SIZE_ALIASES,
    VARIANT_NAMES,
    check_variant_name,
    variant_for_size,
)

_TINY_SPEC = ModelSpec(
    num_layers=1,
    model_dims=64,
    hidden_dims=128,
    num_heads=2,
    dim_per_head=32,
    ffn_use_gated_activation=False,
)


class TinyModel(upstream_model.MagentaRT2ModelBase):
    """The upstream model class with tiny transformers (test and CI variant)."""

    encoder_size = _TINY_SPEC
    decoder_temporal_size = _TINY_SPEC
    decoder_depth_size = _TINY_SPEC
    encoder_max_past_horizon = 25
    decoder_temporal_self_attention_max_past_horizon = 25
    decoder_temporal_cross_attention_max_past_horizon = 25


def _full_codec(rvq_levels: int) -> spectrostream.SpectroStream.Config:
    return spectrostream.stft_spectrostream_40ms_generic_48khz_stereo_config(
        rvq_truncation_level=rvq_levels, use_unique_codes=False
    )


def _tiny_codec(rvq_levels: int) -> spectrostream.SpectroStream.Config:
    """The real codec topology (same STFT and strides) with 4-channel convs."""
    full = _full_codec(rvq_levels)
    features = 16
    return dataclasses.replace(
        full,
        encoder_base_conv_depth=4,
        decoder_base_conv_depth=4,
        num_features=features,
        quantizer=dataclasses.replace(
            full.quantizer, num_quantizers=rvq_levels, embedding_dim=features
        ),
    )


@dataclasses.dataclass(frozen=True)
class Variant:
    """A servable model: the depthformer class, its codec and where its weights live."""

    name: str
    model_class: type[upstream_model.MagentaRT2ModelBase]
    codec: Callable[[int], spectrostream.SpectroStream.Config]
    checkpoint_file: str
    description: str

    def model(self) -> upstream_model.MagentaRT2ModelBase:
        return self.model_class()

    @property
    def rvq_levels(self) -> int:
        return self.model_class.spectrostream.rvq_truncation_level

    @property
    def context_frames(self) -> int:
        """Frames of past audio the temporal transformer can still see: each of its N
        layers attends W frames back, so about N*W, capped at the 20 s (500 frames) the
        models were designed for (upstream's MLX export sets W = 500 // N). Prefill
        beyond this only costs time."""
        model = self.model_class
        reach = (model.decoder_temporal_size.num_layers
                 * model.decoder_temporal_self_attention_max_past_horizon)
        return min(20 * FRAMES_PER_SECOND, reach)

    def codec_config(self) -> spectrostream.SpectroStream.Config:
        return self.codec(self.rvq_levels)

    @property
    def decoder_delay_frames(self) -> int:
        """Steps by which streamed audio lags the codes it is made from.

        The SpectroStream decoder looks one frame ahead (`decoder_lookahead`, an
        `sl.Lookahead` at its end). Run step by step, that lookahead becomes delay: a
        step's audio is the frame whose codes were sampled one step earlier, and a
        fresh state's first step is silence. Not counted, every stream would be one
        frame late: 40 ms of silence first, and a loop's continuation opening with the
        loop's own last frame, 40 ms behind the bar grid (`Session.record` counts it).
        """
        codec = self.codec_config()
        samples = sl_utils.get_output_latency(
            sl.Serial.Config([codec.decoder, codec.inverse_stft]))
        frames, rest = divmod(samples, FRAME_SAMPLES)
        if rest:
            raise ValueError(f"{self.name}: the codec's delay of {samples} samples is not "
                             f"a whole number of {FRAME_SAMPLES}-sample frames")
        return frames

    def default_compute_dtype(self):
        return self.model_class.compute_dtype


VARIANTS: dict[str, Variant] = {
    "mrt2_base": Variant(
        "mrt2_base",
        upstream_model.get_model_class("mrt2_base"),
        _full_codec,
        "checkpoints/mrt2_base.safetensors",
        "Magenta RT 2 base (2.4B): best quality, needs a GPU for real time.",
    ),
    "mrt2_small": Variant(
        "mrt2_small",
        upstream_model.get_model_class("mrt2_small"),
        _full_codec,
        "checkpoints/mrt2_small.safetensors",
        "Magenta RT 2 small (230M): lighter, many streams per GPU.",
    ),
    "tiny": Variant(
        "tiny",
        TinyModel,
        _tiny_codec,
        "checkpoints/tiny.safetensors",
        "Random-weight test model with the real frame geometry; runs offline on CPU.",
    ),
}


if tuple(VARIANTS) != VARIANT_NAMES:  # the API checks names against the catalog alone
    raise ImportError(f"catalog.VARIANT_NAMES {VARIANT_NAMES} and VARIANTS disagree")


def get_variant(name: str) -> Variant:
    return VARIANTS[check_variant_name(name)]


COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
