"""Style prompts: embedding, blending with finetune steering, and ramps."""

from .blend import SteeringAssets, blend
from .embedder import StyleModel
from .ramp import RampState, StyleRamp

__all__ = ["RampState", "SteeringAssets", "StyleModel", "StyleRamp", "blend"]
