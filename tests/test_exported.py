"""Traced programs on disk (`serve_app.engine.exported`), on small functions in this
process: the session's cache directory (conftest) is where they go. The model's own
step read back in a new process is `test_compile_cache`'s."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from serve_app.engine import exported

_names = itertools.count()


class Traced:
    """A function that counts how often its Python runs (i.e. it is traced)."""

    def __init__(self, scale: float) -> None:
        self.scale, self.traces = scale, 0
        self.__name__ = f"scaled_{next(_names)}"  # one program file per test

    def __call__(self, x: jax.Array, y: dict[str, jax.Array]) -> dict[str, jax.Array]:
        self.traces += 1
        return {"sum": x * self.scale + y["b"], "parts": (x, jnp.cos(y["b"]))}


def programs(name: str) -> list[str]:
    return sorted(p.name for p in exported.directory().glob(f"{name}-*.exp"))


ARGS = (np.arange(4, dtype=np.float32), {"b": np.ones(4, np.float32)})


def test_a_program_is_traced_once_and_then_read_back(compile_cache):
    fn = Traced(2.0)
    first = exported.jit(fn, salt="2")(*ARGS)
    assert fn.traces == 1 and len(programs(fn.__name__)) == 1
    again = exported.jit(fn, salt="2")(*ARGS)  # a new jit: as a new process would
    assert fn.traces == 1, "read from disk, not traced"
    np.testing.assert_array_equal(again["sum"], np.arange(4) * 2.0 + 1)
    np.testing.assert_array_equal(again["parts"][1], first["parts"][1])
    assert isinstance(again["parts"], tuple)  # the output's tree comes back too


def test_another_salt_or_shape_is_another_program(compile_cache):
    two, three = Traced(2.0), Traced(3.0)
    three.__name__ = two.__name__  # same name, different closure: only the salt tells
    exported.jit(two, salt="2")(*ARGS)
    out = exported.jit(three, salt="3")(*ARGS)
    assert three.traces == 1 and len(programs(two.__name__)) == 2
    np.testing.assert_array_equal(out["sum"], np.arange(4) * 3.0 + 1)
    longer = (np.arange(6, dtype=np.float32), {"b": np.ones(6, np.float32)})
    assert exported.jit(three, salt="3")(*longer)["sum"].shape == (6,)
    assert three.traces == 2 and len(programs(two.__name__)) == 3


def test_a_program_traced_under_other_random_settings_is_another_program(compile_cache):
    """Random draws trace differently under JAX's threefry settings (the sampler's noise
    among them): a program kept under one is not read back under the other."""
    def noisy(key: jax.Array) -> jax.Array:
        return jax.random.uniform(key, (8,))

    noisy.__name__ = f"noisy_{next(_names)}"
    key = jax.random.PRNGKey(3)
    partitioned = exported.jit(noisy, salt="")(key)
    with jax.threefry_partitionable(False):
        serial = exported.jit(noisy, salt="")(key)
        assert len(programs(noisy.__name__)) == 2
        np.testing.assert_array_equal(serial, jax.random.uniform(key, (8,)))
    assert not np.array_equal(serial, partitioned)


def test_an_unreadable_program_is_traced_again_and_replaced(compile_cache, caplog):
    fn = Traced(2.0)
    exported.jit(fn, salt="2")(*ARGS)
    (name,) = programs(fn.__name__)
    (exported.directory() / name).write_bytes(b"half a program")
    with caplog.at_level("WARNING"):
        out = exported.jit(fn, salt="2")(*ARGS)
    assert "unreadable" in caplog.text and name in caplog.text
    assert fn.traces == 2
    np.testing.assert_array_equal(out["sum"], np.arange(4) * 2.0 + 1)
    exported.jit(fn, salt="2")(*ARGS)
    assert fn.traces == 2, "the program written again is read"


@pytest.mark.parametrize("from_disk", [False, True])
def test_donated_arguments_are_given_up(compile_cache, from_disk):
    fn = Traced(2.0)
    if from_disk:
        exported.jit(fn, salt="2")(*ARGS)
    x = jnp.arange(4, dtype=jnp.float32)
    exported.jit(fn, salt="2", donate_argnums=(0,))(x, {"b": jnp.ones(4, jnp.float32)})
    assert x.is_deleted()


def test_programs_unused_for_a_month_are_deleted_when_another_is_written(compile_cache):
    """Each code version writes its own programs; those no process has read for
    UNUSED_DAYS go, those read lately stay (a read touches them)."""
    import os
    import time

    old, used = Traced(2.0), Traced(3.0)
    exported.jit(old, salt="2")(*ARGS)
    exported.jit(used, salt="3")(*ARGS)
    (old_file,), (used_file,) = programs(old.__name__), programs(used.__name__)
    month_ago = time.time() - (exported.UNUSED_DAYS + 1) * 86400
    for name in (old_file, used_file):
        os.utime(exported.directory() / name, (month_ago, month_ago))
    exported.jit(used, salt="3")(*ARGS)  # read back: in use again
    assert used.traces == 1
    exported.jit(Traced(4.0), salt="4")(*ARGS)  # a write prunes
    assert programs(old.__name__) == [] and programs(used.__name__) == [used_file]


def test_a_result_of_a_trace_is_kept_and_read_back(compile_cache):
    """What `remembered` keeps (the weights' layout, for one) is made once per salt and
    argument shapes, then read back; an unreadable file is made again."""
    made = []

    def make():
        made.append(1)
        return {"perms": {3: (1, 0)}, "casts": {}}

    name = f"kept_{next(_names)}"
    first = exported.remembered(name, "a", ARGS, make)
    assert exported.remembered(name, "a", ARGS, make) == first and len(made) == 1
    exported.remembered(name, "b", ARGS, make)  # another salt
    longer = (np.arange(6, dtype=np.float32), {"b": np.ones(6, np.float32)})
    exported.remembered(name, "a", longer, make)  # other shapes
    assert len(made) == 3 and len(programs(name)) == 3
    for path in exported.directory().glob(f"{name}-*.exp"):
        path.write_bytes(b"half")
    assert exported.remembered(name, "a", ARGS, make) == first and len(made) == 4
