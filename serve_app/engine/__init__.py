"""The batched streaming engine over upstream Magenta RT 2 building blocks."""

import magenta_rt  # noqa: F401  (first: it puts the vendored sequence_layers on the path)

from .batch import BatchedEngine, CapacityError, SessionSnapshot
from .loader import LoadedModel, load_model
from .session import Controls, Session
from .variants import CHANNELS, FRAME_SAMPLES, FRAMES_PER_SECOND, SAMPLE_RATE, VARIANTS

__all__ = [
    "CHANNELS",
    "FRAMES_PER_SECOND",
    "FRAME_SAMPLES",
    "SAMPLE_RATE",
    "VARIANTS",
    "BatchedEngine",
    "CapacityError",
    "Controls",
    "LoadedModel",
    "Session",
    "SessionSnapshot",
    "load_model",
]
