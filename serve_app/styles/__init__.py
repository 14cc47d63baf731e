"""Style prompts: embedding, blending with finetune steering, and ramps."""

from .blend import SteeringAssets, blend
from .embedder import StyleModel
from .ramp import StyleRamp

__all__ = ["SteeringAssets", "StyleModel", "StyleRamp", "blend"]
