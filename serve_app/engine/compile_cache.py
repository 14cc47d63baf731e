"""XLA's persistent compilation cache, on by default.

A replica compiles one step per batch bucket before it serves. On an H100 that is
37-55 s a bucket cold and about 12 s from this cache (mrt2_base, measured with
scripts/bench_engine.py), so a replica that restarts or is added by the autoscaler
is ready minutes sooner. The traced programs those compiles start from are kept in
its `exported/` (`exported.py`), so a start does not run the model's Python either.

Every compilation is kept, not only those over JAX's default threshold of 1 s: a
replica start also compiles about ten small programs (the row moves between
buckets, state set-up) that each take under a second but add up to 2-3 s of a tiny
replica's 12-15 s start on a 2-core CPU, and a few KB each on disk.

`MRT_COMPILE_CACHE` names the directory (default `~/.cache/mrt-serve/xla`, or under
`$XDG_CACHE_HOME`); `off` disables it. Every code version and config compiles programs
of its own, so the directory is kept under `MRT_COMPILE_CACHE_MAX_GB` (default 16; a cold
mrt2_base replica's 5 buckets and forced runs are the largest part): JAX deletes the
least recently used compiled programs past it (`JAX_COMPILATION_CACHE_MAX_SIZE`, in
bytes, wins). JAX's own `JAX_COMPILATION_CACHE_DIR`, when
set, wins. JAX decides whether to use the cache at the first compilation in a
process, so this must run before any: `load_model` calls it first thing.
"""

from __future__ import annotations

import logging
import os
import pathlib

import jax

log = logging.getLogger(__name__)

ENV = "MRT_COMPILE_CACHE"
MAX_GB_ENV = "MRT_COMPILE_CACHE_MAX_GB"
DEFAULT_MAX_GB = 16.0


def default_dir() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "mrt-serve" / "xla"


def max_bytes() -> int:
    """The cache's size limit; raises ValueError naming the variable for a bad value."""
    setting = os.environ.get(MAX_GB_ENV, "").strip()
    try:
        gb = float(setting) if setting else DEFAULT_MAX_GB
    except ValueError:
        gb = -1.0
    if not gb > 0:
        raise ValueError(f"{MAX_GB_ENV}: a size in GB above 0, got {setting!r}")
    return int(gb * 2**30)


def enable() -> pathlib.Path | None:
    """Points JAX at the cache directory; returns it, or None when disabled."""
    current = jax.config.jax_compilation_cache_dir
    if current:
        return pathlib.Path(current)
    setting = os.environ.get(ENV, "").strip()
    if setting.lower() in {"off", "0", "false", "no"}:
        return None
    path = pathlib.Path(setting).expanduser() if setting else default_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a read-only home: compile every time rather than fail
        log.warning("compilation cache disabled: %s is not writable (%s)", path, e)
        return None
    limit = max_bytes()  # a bad value is an error before anything is configured
    jax.config.update("jax_compilation_cache_dir", str(path))
    if "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ:  # JAX's own wins
        jax.config.update("jax_compilation_cache_max_size", limit)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:  # JAX's own wins
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    log.debug("XLA compilation cache at %s", path)
    return path
