"""The persistent caches: a second process compiles nothing it compiled before (XLA's),
and runs none of the model's Python to trace its steps again (`exported`).

Subprocesses, because JAX decides whether to use the cache at a process's first
compilation (the test process decided long ago).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

WARM_UP = """
import jax
hits = []
jax.monitoring.register_event_listener(
    lambda event, **kw: hits.append(event) if event.endswith("cache_hits") else None)
from serve_app.engine import BatchedEngine, load_model, model
traced = []  # each time the step's Python runs
forcing = model._step_forcing
model._step_forcing = lambda *args, **kwargs: traced.append(1) or forcing(*args, **kwargs)
loaded = load_model("tiny")  # the weights' layout comes from a trace of the step too
engine = BatchedEngine(loaded.model, loaded.style, buckets=(2,))
engine.warmup_buckets()
print("TRACED", len(traced))
print("HITS", len(hits))
compiled = []  # what serving compiles after warm-up: nothing (no session waits on XLA)
jax.monitoring.register_event_duration_secs_listener(
    lambda event, seconds, **kw: compiled.append(kw.get("fun_name"))
    if event.endswith("backend_compile_duration") else None)
from serve_app.engine.session import Session
a, b = (Session(loaded.style.embed_text("disco"), seed=i) for i in range(2))
for session in (a, b):
    engine.add(session)
    engine.step()
moved = engine.snapshot(a.id)
engine.remove(a.id)
engine.step()
engine.restore(moved)
engine.step()
print("SERVING_COMPILED", compiled)
"""


def run_fresh(script: str, cwd, **env: str) -> str:
    """`script`'s stdout from a new Python process with `env` added (and no JAX cache
    directory of the caller's)."""
    env = {**{k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}, **env}
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def warm_up(tmp_path, tiny_repo, cache: str) -> tuple[int, int]:
    """(XLA cache hits, times the step's Python ran) warming up a 2-row bucket in a new
    process; sessions joining, stepping, moving out and back in after it compile nothing
    (the step takes the same committed state in both: `StreamingModel.on_device`)."""
    out = run_fresh(WARM_UP, tmp_path, MRT_COMPILE_CACHE=cache, MRT_TINY_REPO=str(tiny_repo))
    assert "SERVING_COMPILED []" in out, out
    return int(out.split("HITS")[-1].split()[0]), int(out.split("TRACED")[-1].split()[0])


def listing(cache) -> list[str]:
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*"))


def test_second_process_reuses_the_compiled_step(tmp_path, tiny_repo):
    cache = tmp_path / "xla"
    hits, traced = warm_up(tmp_path, tiny_repo, str(cache))
    assert hits == 0 and traced >= 1
    written = listing(cache)
    assert any(name.startswith("jit_step-") for name in written), written
    assert any(name.startswith("exported/step-") for name in written), written
    hits, traced = warm_up(tmp_path, tiny_repo, str(cache))
    assert hits >= 1 and traced == 0, "compiled and traced programs read back"
    assert listing(cache) == written, "nothing new compiled or traced"


COMPILE_ONE = """
import jax
import pytest
from serve_app.engine import compile_cache
print("DIR", compile_cache.enable())
jax.jit(lambda x: x * 2 + 1)(jax.numpy.ones(3)).block_until_ready()
print("CONFIGURED", jax.config.jax_compilation_cache_dir)
"""


def test_off_writes_nothing(tmp_path):
    """`off`: no directory, not even the default one (under $XDG_CACHE_HOME here), and
    JAX is not pointed at any. A trivial function, not the engine: whether JAX gets a
    cache is decided before the first compilation, whatever it is."""
    out = run_fresh(COMPILE_ONE, tmp_path, MRT_COMPILE_CACHE="off",
                    XDG_CACHE_HOME=str(tmp_path))
    assert "DIR None" in out and "CONFIGURED None" in out, out
    assert list(tmp_path.iterdir()) == []


COMPILE_THREE = """
import warnings
import jax
import pytest
from serve_app.engine import compile_cache
compile_cache.enable()
with warnings.catch_warnings(record=True) as caught:  # JAX's only word on a failed write
    warnings.simplefilter("always")
    for k in range(3):
        jax.jit(lambda x, k=k: x * (k + 2) + 1)(jax.numpy.ones(3)).block_until_ready()
print("LIMIT", jax.config.jax_compilation_cache_max_size)
print("CACHE_WARNINGS", [str(w.message) for w in caught if "compilation cache" in str(w.message)])
"""


def test_the_cache_is_kept_under_its_size_limit(tmp_path):
    cache = tmp_path / "xla"
    out = run_fresh(COMPILE_THREE, tmp_path, MRT_COMPILE_CACHE=str(cache))
    assert f"LIMIT {16 * 2**30}" in out, out  # the default
    assert "CACHE_WARNINGS []" in out, out
    entries = {p.name: p.stat().st_size for p in cache.glob("*-cache")}
    assert len(entries) >= 3, entries
    limit = max(entries.values()) + 1  # room for any one program, not for all of them
    small = tmp_path / "small"
    out = run_fresh(COMPILE_THREE, tmp_path, MRT_COMPILE_CACHE=str(small),
                    MRT_COMPILE_CACHE_MAX_GB=str(limit / 2**30))
    assert f"LIMIT {limit}" in out, out
    kept = [p.stat().st_size for p in small.glob("*-cache")]
    assert kept and sum(kept) <= limit


def test_jax_s_own_directory_variable_gets_the_size_limit_too(tmp_path):
    """Without it, that process would write programs with no last-use time (above)."""
    cache = tmp_path / "jax-named"
    out = run_fresh(COMPILE_THREE, tmp_path, JAX_COMPILATION_CACHE_DIR=str(cache))
    assert f"LIMIT {16 * 2**30}" in out and "CACHE_WARNINGS []" in out, out
    programs = list(cache.glob("*-cache"))
    assert len(programs) >= 3 and len(list(cache.glob("*-atime"))) == len(programs)


def test_a_bad_size_limit_is_named(monkeypatch):
    from serve_app.engine import compile_cache

    for bad in ("lots", "0", "-2"):
        monkeypatch.setenv("MRT_COMPILE_CACHE_MAX_GB", bad)
        with pytest.raises(ValueError) as raised:
            compile_cache.max_bytes()
        assert str(raised.value) == f"MRT_COMPILE_CACHE_MAX_GB: a size in GB above 0, got {bad!r}"
    monkeypatch.setenv("MRT_COMPILE_CACHE_MAX_GB", "0.5")
    assert compile_cache.max_bytes() == 2**29


UNLIMITED = """
import os
import jax
jax.config.update("jax_compilation_cache_dir", os.environ["UNLIMITED_DIR"])  # JAX's defaults
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
for k in range(2):
    jax.jit(lambda x, k=k: x - k)(jax.numpy.ones(3)).block_until_ready()
"""


def test_programs_written_without_a_size_limit_do_not_stop_the_cache(tmp_path):
    """A JAX process with no size limit (JAX's default; an earlier mrt-serve) writes
    programs without the last-use times a limited cache reads before every write: before
    they were adopted, every later write failed and the replica compiled cold each start."""
    cache = tmp_path / "xla"
    run_fresh(UNLIMITED, tmp_path, UNLIMITED_DIR=str(cache))
    foreign = sorted(p.name for p in cache.glob("*-cache"))
    assert len(foreign) >= 2 and not list(cache.glob("*-atime")), listing(cache)
    out = run_fresh(COMPILE_THREE, tmp_path, MRT_COMPILE_CACHE=str(cache))
    assert "CACHE_WARNINGS []" in out, out
    programs = sorted(p.name for p in cache.glob("*-cache"))
    assert len(programs) >= len(foreign) + 3 and set(foreign) <= set(programs), programs
    times = {p.name.removesuffix("-atime") for p in cache.glob("*-atime")}
    assert times == {name.removesuffix("-cache") for name in programs}
