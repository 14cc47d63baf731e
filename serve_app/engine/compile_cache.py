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
bytes, wins). JAX's own `JAX_COMPILATION_CACHE_DIR`, when set, names the directory
instead; the limit applies to it all the same. JAX decides whether to use the cache at
the first compilation in a process, so this must run before any: `load_model` calls it
first thing.

Entries without a last-use time are adopted when the cache is enabled. JAX's
size-limited cache keeps one (`<key>-atime`) beside each program and, before every
write, reads them all to choose what to evict; a program written by a process with no
limit (JAX's default: an earlier mrt-serve, or any JAX program pointed at the same
directory) has none, so that read fails and *every* later write is dropped with a
warning: replicas then compile cold on every start. Adopting gives each such program its
file's modification time as its last use.
"""

from __future__ import annotations

import logging
import os
import pathlib
from collections.abc import Mapping

import filelock
import jax

log = logging.getLogger(__name__)

ENV = "MRT_COMPILE_CACHE"
PROGRAM_SUFFIX, LAST_USE_SUFFIX = "-cache", "-atime"  # JAX's LRU cache's file names
MAX_GB_ENV = "MRT_COMPILE_CACHE_MAX_GB"
DEFAULT_MAX_GB = 16.0


def default_dir() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "mrt-serve" / "xla"


def max_bytes(environ: Mapping[str, str] = os.environ) -> int:
    """The cache's size limit; raises ValueError naming the variable for a bad value."""
    setting = environ.get(MAX_GB_ENV, "").strip()
    try:
        gb = float(setting) if setting else DEFAULT_MAX_GB
    except ValueError:
        gb = -1.0
    if not gb > 0:
        raise ValueError(f"{MAX_GB_ENV}: a size in GB above 0, got {setting!r}")
    return int(gb * 2**30)


def enable() -> pathlib.Path | None:
    """Points JAX at the cache directory, with its size limit; returns it, or None when
    disabled."""
    path = chosen_dir()
    if path is None:
        return None
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
    if jax.config.jax_compilation_cache_max_size != -1:  # -1: JAX keeps no last-use times
        try:
            adopted = adopt_untimed_programs(path)
        except (OSError, filelock.Timeout) as e:  # JAX's writes may fail; serving must not
            log.warning("compilation cache %s: programs without a last-use time not "
                        "adopted (%s); JAX may keep nothing new", path, e)
        else:
            if adopted:
                log.info("compilation cache: %d programs without a last-use time adopted",
                         adopted)
    log.debug("XLA compilation cache at %s", path)
    return path


def chosen_dir() -> pathlib.Path | None:
    """JAX's own setting, else `MRT_COMPILE_CACHE`, else the default; None for `off`."""
    current = jax.config.jax_compilation_cache_dir
    if current:
        return pathlib.Path(current)
    setting = os.environ.get(ENV, "").strip()
    if setting.lower() in {"off", "0", "false", "no"}:
        return None
    return pathlib.Path(setting).expanduser() if setting else default_dir()


def adopt_untimed_programs(path: pathlib.Path) -> int:
    """Gives every compiled program in `path` that has no last-use time its file's
    modification time (see the module's docstring: without, JAX writes nothing more);
    returns how many. Under JAX's own lock, so no process is between writing a program
    and its time."""
    with filelock.FileLock(path / ".lockfile", timeout=60):
        adopted = 0
        for program in path.glob(f"*{PROGRAM_SUFFIX}"):
            last_use = path / (program.name.removesuffix(PROGRAM_SUFFIX) + LAST_USE_SUFFIX)
            if last_use.exists():
                continue
            try:
                written = program.stat().st_mtime_ns
            except FileNotFoundError:  # evicted meanwhile by a process not taking the lock
                continue
            last_use.write_bytes(written.to_bytes(8, "little"))
            adopted += 1
        return adopted
