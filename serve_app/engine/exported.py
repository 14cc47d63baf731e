"""Traced programs kept on disk, so that a replica start does not trace the model again.

The XLA cache (`compile_cache`) spares a replica start the compile of each step, not
the trace: JAX still runs the model's Python (flax, sequence_layers, our CPU rewrite)
to learn which program to look up. For `tiny` on 2 cores that is most of a bucket's
warm-up from a warm XLA cache (bucket 4: 2.5-3.0 s traced, 0.9-1.0 s from here). A
`jax.export` of the traced program (StableHLO) is written beside the XLA cache; a
process that finds it deserializes it and wraps it in a jit whose compile the XLA
cache then serves. Nothing here is on the per-step path: the lookup happens while
that wrapper is traced, once per shape, and calls go through `jax.jit`'s own
dispatch.

A program is found by a key of everything it is traced from: the name, the argument
trees, shapes and dtypes, the backend, the versions of jax, jaxlib and flax, the JAX
settings that decide how random draws are traced (`TRACE_SETTINGS`), a hash of the
sources of `magenta_rt` and of this package, and the caller's `salt` (the model's
config and whatever else its closure holds). A stale program would play wrong
music, so anything that changes the trace must change the key; when in doubt the key
misses and the program is traced and written again. A program that cannot be
exported or read is traced as usual.

`remembered` keeps other results of a trace the same way (the weight layout a step
reads, `cpu_tuning`), so that a start traces nothing at all.

Each code version writes programs of its own, so the directory would grow with every
deployment: a program read is touched, and one that no process has read or written
for `UNUSED_DAYS` is deleted when the next program is written.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import logging
import os
import pathlib
import pickle
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
import magenta_rt

log = logging.getLogger(__name__)

T = TypeVar("T")

SUBDIR = "exported"
UNUSED_DAYS = 30.0


def directory() -> pathlib.Path | None:
    """Beside the XLA cache, and off when it is off (`compile_cache.enable` decides)."""
    xla = jax.config.jax_compilation_cache_dir
    return pathlib.Path(xla) / SUBDIR if xla else None


@functools.cache
def _code_version() -> str:
    """What the traced programs are made of: versions and the Python that traces them."""
    digest = hashlib.sha256()
    for dist in ("jax", "jaxlib", "flax"):
        digest.update(f"{dist}={importlib.metadata.version(dist)};".encode())
    for package in (pathlib.Path(magenta_rt.__file__).parent, pathlib.Path(__file__).parent):
        for path in sorted(package.rglob("*.py")):
            digest.update(path.relative_to(package).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


# JAX settings a trace reads beyond its arguments: which bits a key draws (the sampler's
# noise; `sampling.level_gumbel` draws differently under each) and how they become floats.
TRACE_SETTINGS = ("jax_threefry_partitionable", "jax_default_prng_impl",
                  "jax_high_dynamic_range_gumbel", "jax_enable_x64")


def _settings() -> str:
    return ";".join(f"{name}={getattr(jax.config, name)}" for name in TRACE_SETTINGS)


def _key(name: str, salt: str, avals: Sequence[Any], treedef: Any) -> str:
    digest = hashlib.sha256()
    for part in (name, salt, _code_version(), _settings(), jax.default_backend(),
                 str(treedef)):
        digest.update(part.encode())
        digest.update(b"\0")
    for aval in avals:
        digest.update(f"{aval.shape}{aval.dtype}{aval.weak_type};".encode())
    return digest.hexdigest()[:32]


def _write(path: pathlib.Path, data: bytes) -> None:
    """Atomically: another replica may be reading the same program."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _prune(where: pathlib.Path, unused_days: float = UNUSED_DAYS) -> int:
    """Deletes the programs not read or written for `unused_days` (their modification
    time: a read touches it); returns how many. Another process may be pruning too."""
    cutoff = time.time() - unused_days * 86400
    pruned = 0
    for path in where.glob("*.exp"):
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
                pruned += 1
        except FileNotFoundError:
            pass
    if pruned:
        log.info("deleted %d traced programs unused for %.0f days from %s", pruned,
                 unused_days, where)
    return pruned


def _read(path: pathlib.Path, decode: Callable[[Any], T]) -> T | None:
    """`decode` of what was kept at `path`, touched as in use (kept by `_prune`); None
    when there is none, or it is unreadable (truncated, from an incompatible writer):
    the caller makes it again."""
    try:
        value = decode(pickle.loads(path.read_bytes()))
        with contextlib.suppress(OSError):
            os.utime(path)
        return value
    except FileNotFoundError:
        return None
    except Exception as e:
        log.warning("kept %s unreadable (%s); made again", path.name, e)
        return None


def _keep(where: pathlib.Path, path: pathlib.Path, value: Any) -> None:
    """Writes `value` at `path` (an OSError is the caller's) and deletes the unused."""
    _write(path, pickle.dumps(value))
    try:
        _prune(where)
    except OSError as e:  # a cache on a read-only or flaky volume: keep serving
        log.warning("unused traced programs not deleted from %s (%s)", where, e)


def _place(where: pathlib.Path, name: str, salt: str, args: tuple[Any, ...]
           ) -> tuple[pathlib.Path, list[Any], Any]:
    """Where `name` traced on `args` is kept; the arguments' avals and tree."""
    leaves, treedef = jax.tree.flatten(args)
    avals = [jax.typeof(leaf) for leaf in leaves]
    return where / f"{name}-{_key(name, salt, avals, treedef)}.exp", avals, treedef


def _deserialized(kept: tuple[bytes, Any]) -> tuple[jax.export.Exported, Any]:
    exported_bytes, out_tree = kept
    return jax.export.deserialize(bytearray(exported_bytes)), out_tree


def _export(name: str, fn: Callable[..., Any], avals: Sequence[Any], treedef: Any
            ) -> tuple[jax.export.Exported, Any]:
    """Traces `fn` on flat arguments (the export keeps no custom pytree types)."""
    out_tree = None

    def flat(*flat_args: Any) -> list[Any]:
        nonlocal out_tree
        out, out_tree = jax.tree.flatten(fn(*jax.tree.unflatten(treedef, flat_args)))
        return out

    flat.__name__ = name
    specs = [jax.ShapeDtypeStruct(aval.shape, aval.dtype) for aval in avals]
    return jax.export.export(jax.jit(flat))(*specs), out_tree


def _program(name: str, fn: Callable[..., Any], salt: str, args: tuple[Any, ...]
             ) -> tuple[jax.export.Exported, Any] | None:
    """The program for these arguments: from disk, or traced now and written."""
    where = directory()
    if where is None:
        return None
    path, avals, treedef = _place(where, name, salt, args)
    found = _read(path, _deserialized)
    if found is not None:
        log.debug("exported program %s read from %s", name, path.name)
        return found
    try:
        exported, out_tree = _export(name, fn, avals, treedef)
        _keep(where, path, (bytes(exported.serialize()), out_tree))
    except Exception as e:  # e.g. an op export does not support: trace as usual
        log.warning("program %s not exported (%s); it is traced at each start", name, e)
        return None
    log.debug("exported program %s written to %s", name, path.name)
    return exported, out_tree


def remembered(name: str, salt: str, args: tuple[Any, ...], make: Callable[[], T]) -> T:
    """`make()`, a picklable result of tracing something on `args`, kept on disk under
    the same key a program would be (name, salt, the arguments' shapes, the code's
    version): made and written when absent or unreadable, read back otherwise."""
    where = directory()
    if where is None:
        return make()
    path, _, _ = _place(where, name, salt, args)
    found = _read(path, lambda value: value)
    if found is not None:
        return found
    value = make()
    try:
        _keep(where, path, value)
    except OSError as e:  # a cache on a read-only or flaky volume: keep serving
        log.warning("result %s not kept in %s (%s)", name, where, e)
    return value


def jit(fn: Callable[..., Any], *, salt: str, donate_argnums: tuple[int, ...] = ()
        ) -> Callable[..., Any]:
    """`jax.jit(fn, donate_argnums=...)`, whose trace for each new argument shape
    comes from an exported program on disk when there is one."""
    name = getattr(fn, "__name__", "program")

    @functools.wraps(fn)  # the name the XLA cache and profiles show
    def run(*args: Any) -> Any:
        found = _program(name, fn, salt, args)
        if found is None:
            return fn(*args)
        exported, out_tree = found
        return jax.tree.unflatten(out_tree, exported.call(*jax.tree.leaves(args)))

    return jax.jit(run, donate_argnums=donate_argnums)
