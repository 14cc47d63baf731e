"""Checkpoint tensors <-> Flax parameter trees, in upstream's safetensors layout.

Upstream stores the whole sampler as flat `params/a/b/c` keys (see
`magenta_rt.jax.system._load_jax_weights`); the SpectroStream encoder ships beside
it as `params/encoder/...`. Loading checks every tensor against the tree the model
expects before any weight reaches the device, so a wrong or truncated file fails
with the name of the first bad tensor instead of deep inside XLA.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any

import flax.traverse_util as traverse
import jax
import numpy as np
import safetensors
import safetensors.numpy

log = logging.getLogger(__name__)

SEP = "/"
# Benchmark weights (`random_like`) repeat one block of this many random values.
RANDOM_BLOCK = 1 << 20
RANDOM_SCALE = 0.02


class CheckpointError(ValueError):
    """A checkpoint file is missing tensors, has wrongly shaped ones, or is unreadable."""


def flatten(tree: dict) -> dict[str, Any]:
    return traverse.flatten_dict(tree, sep=SEP)


def unflatten(flat: dict[str, Any]) -> dict:
    return traverse.unflatten_dict({tuple(k.split(SEP)): v for k, v in flat.items()})


def save(tree: dict, path: pathlib.Path) -> None:
    """Writes a parameter tree as flat safetensors (the layout `load` reads)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {k: np.ascontiguousarray(np.asarray(v)) for k, v in flatten(tree).items()}
    tmp = path.with_suffix(path.suffix + ".partial")
    safetensors.numpy.save_file(flat, str(tmp))
    tmp.replace(path)


def random_like(expected: dict, seed: int) -> dict:
    """Host arrays of `expected`'s shapes and dtypes filled with small random values,
    without running the model's initialisers: what benchmarks serve, since speed does
    not depend on weight values. Each array repeats one block of `RANDOM_BLOCK` normal
    values (times `RANDOM_SCALE`) from its own offset, so filling costs a memory copy
    (mrt2_base's 9.8 GB: as fast as the host writes fresh memory), where initialising
    through the model compiles its whole initialisation first (21 s for mrt2_small on
    the 2-core box)."""
    rng = np.random.default_rng(seed)
    block = rng.standard_normal(RANDOM_BLOCK, np.float32) * np.float32(RANDOM_SCALE)

    def fill(spec: Any) -> np.ndarray:
        size = int(np.prod(spec.shape, dtype=np.int64))
        start = int(rng.integers(RANDOM_BLOCK))
        own = np.concatenate([block[start:], block[:start]]).astype(spec.dtype)
        out = np.empty(size, spec.dtype)
        whole = size // RANDOM_BLOCK  # broadcast, not np.resize: 12x faster here
        out[: whole * RANDOM_BLOCK].reshape(whole, RANDOM_BLOCK)[:] = own
        out[whole * RANDOM_BLOCK:] = own[: size - whole * RANDOM_BLOCK]
        return out.reshape(spec.shape)

    return jax.tree.map(fill, expected)


def _open(path: pathlib.Path):
    try:
        return safetensors.safe_open(str(path), framework="numpy")
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e


def _check_tensors(f, path: pathlib.Path, want: dict, prefix: str) -> int:
    """Raises CheckpointError naming the first missing or misshapen tensor; returns the
    number of tensors in the file that the model does not use."""
    available = set(f.keys())
    missing = [k for k in want if prefix + k not in available]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{path}: missing tensor {prefix + missing[0]!r}{more}")
    for key, spec in want.items():
        shape = tuple(f.get_slice(prefix + key).get_shape())
        if shape != tuple(spec.shape):
            raise CheckpointError(
                f"{path}: tensor {prefix + key!r} has shape {shape}, "
                f"the model expects {tuple(spec.shape)}"
            )
    return len(available) - len(want)


def check(path: pathlib.Path, expected: dict, *, prefix: str = "") -> dict:
    """Checks names and shapes against `expected` from the file's header alone (no tensor
    data is read), so a dry run of a model switch costs no memory."""
    want = flatten(expected)
    with _open(path) as f:
        extra = _check_tensors(f, path, want, prefix)
    return {"tensors": len(want), "ignored_tensors": extra}


def load(path: pathlib.Path, expected: dict, *, prefix: str = "") -> dict:
    """Loads the tensors of `expected` (a tree of ShapeDtypeStructs) from `path`.

    `prefix` maps expected keys into the file, e.g. the encoder file stores
    `params/encoder/...` for a tree rooted at the encoder. Extra tensors in the
    file are ignored (upstream files may carry more than one model needs). Every
    tensor is checked before any is read. The tree is on the host: the model stores it
    on the device in the layout and dtypes its step reads (`StreamingModel`), so that
    the checkpoint's float32 copy never takes device memory (mrt2_base: 9.8 GB where
    the model keeps 5.0).
    """
    want = flatten(expected)
    with _open(path) as f:
        extra = _check_tensors(f, path, want, prefix)
        try:
            loaded = {key: f.get_tensor(prefix + key).astype(spec.dtype, copy=False)
                      for key, spec in want.items()}
        except Exception as e:  # truncated data behind a valid header
            raise CheckpointError(f"{path}: tensor data unreadable ({e})") from e
    if extra > 0:
        log.debug("%s: ignored %d tensors the model does not use", path, extra)
    return unflatten(loaded)
