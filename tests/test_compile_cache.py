"""The persistent XLA cache: a second process compiles nothing it compiled before.

Subprocesses, because JAX decides whether to use the cache at a process's first
compilation (the test process decided long ago).
"""

from __future__ import annotations

import os
import subprocess
import sys

WARM_UP = """
import jax
hits = []
jax.monitoring.register_event_listener(
    lambda event, **kw: hits.append(event) if event.endswith("cache_hits") else None)
from serve_app.engine import BatchedEngine, load_model
loaded = load_model("tiny")
BatchedEngine(loaded.model, loaded.style, buckets=(2,)).warmup_buckets()
print("HITS", len(hits))
"""


def run_fresh(script: str, cwd, **env: str) -> str:
    """`script`'s stdout from a new Python process with `env` added (and no JAX cache
    directory of the caller's)."""
    env = {**os.environ, **env}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def warm_up(tmp_path, tiny_repo, cache: str) -> int:
    out = run_fresh(WARM_UP, tmp_path, MRT_COMPILE_CACHE=cache, MRT_TINY_REPO=str(tiny_repo))
    return int(out.split("HITS")[-1])


def test_second_process_reuses_the_compiled_step(tmp_path, tiny_repo):
    cache = tmp_path / "xla"
    assert warm_up(tmp_path, tiny_repo, str(cache)) == 0
    written = sorted(p.name for p in cache.iterdir())
    assert any(name.startswith("jit_step-") for name in written), written
    assert warm_up(tmp_path, tiny_repo, str(cache)) >= 1
    assert sorted(p.name for p in cache.iterdir()) == written, "nothing new compiled"


COMPILE_ONE = """
import jax
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
