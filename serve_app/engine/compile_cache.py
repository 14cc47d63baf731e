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
`$XDG_CACHE_HOME`); `off` disables it. JAX's own `JAX_COMPILATION_CACHE_DIR`, when
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


def default_dir() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "mrt-serve" / "xla"


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
    jax.config.update("jax_compilation_cache_dir", str(path))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:  # JAX's own wins
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    log.debug("XLA compilation cache at %s", path)
    return path
