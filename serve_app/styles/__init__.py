"""Style prompts: embedding, blending with finetune steering, and ramps."""

from .blend import SteeringAssets, blend
from .embedder import StyleModel
from .ramp import MAX_RAMP_SECONDS, RampState, StyleRamp, check_ramp_seconds

__all__ = ["MAX_RAMP_SECONDS", "RampState", "SteeringAssets", "StyleModel", "StyleRamp",
           "blend", "check_ramp_seconds"]
