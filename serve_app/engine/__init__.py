"""The batched streaming engine over upstream Magenta RT 2 building blocks.

Its names load on first use (PEP 562): the ingress imports the light parts (controls,
sessions' host state, the frame geometry) and never the model, so it starts without
JAX. Everything that steps a model imports `BatchedEngine` or `load_model`, and with
them JAX, as before.
"""

import importlib

import magenta_rt  # noqa: F401  (first: it puts the vendored sequence_layers on the path)

from ..frames import CHANNELS, FRAME_SAMPLES, FRAMES_PER_SECOND, SAMPLE_RATE

# name -> the submodule that defines it
_LAZY = {
    "BatchedEngine": "batch",
    "CapacityError": "batch",
    "SessionSnapshot": "batch",
    "LoadedModel": "loader",
    "load_model": "loader",
    "Controls": "session",
    "Session": "session",
    "VARIANTS": "variants",
}

__all__ = ["CHANNELS", "FRAMES_PER_SECOND", "FRAME_SAMPLES", "SAMPLE_RATE", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:  # a submodule (`from serve_app.engine import weights`) or nothing
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value
