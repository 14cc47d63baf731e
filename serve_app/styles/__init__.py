"""Style prompts: embedding, blending with finetune steering, and ramps.

`StyleModel` (MusicCoCa, which brings JAX) loads on first use: the ingress checks ramps
and blends nothing, and starts without it (see `serve_app.engine`)."""

from .blend import SteeringAssets, blend
from .ramp import MAX_RAMP_SECONDS, RampState, StyleRamp, check_ramp_seconds

__all__ = ["MAX_RAMP_SECONDS", "RampState", "SteeringAssets", "StyleModel", "StyleRamp",
           "blend", "check_ramp_seconds"]


def __getattr__(name: str):
    if name != "StyleModel":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from .embedder import StyleModel

    globals()[name] = StyleModel
    return StyleModel
