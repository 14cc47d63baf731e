"""scripts/device_wheels.py: which installed distributions a GPU box is sent, and the
wheels made for it (Ray slimmed, the stand-in for ai_edge_litert).

The download itself needs PyPI and the traced run is the bench_local path that
test_standalone runs; here, the mapping from loaded files to distributions that decides
what is carried."""

from __future__ import annotations

import importlib.metadata as metadata
import json
import os
import pathlib
import subprocess
import sys

import fastapi
import google.protobuf
import numpy
import websockets

import serve_app

from .script_modules import load_script

device_wheels = load_script("device_wheels")


def pip_install(wheel: pathlib.Path, target: pathlib.Path) -> None:
    """As the device command installs a carried wheel."""
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    "--target", str(target), str(wheel)], check=True)


def files(*modules) -> set[str]:
    return {os.path.realpath(m.__file__) for m in modules}


def test_only_what_the_device_image_lacks_is_carried():
    needed = device_wheels.needed_distributions(
        files(fastapi, websockets, numpy, serve_app, os))
    # numpy is the image's own (jax's must not be shadowed), serve_app is this project
    # (it travels as the working tree) and os is the standard library (owned by none)
    assert needed == {"fastapi": metadata.version("fastapi"),
                      "websockets": metadata.version("websockets")}


def test_a_namespace_package_brings_only_the_distribution_that_was_loaded():
    """`google` is shared by protobuf (on the image) and, here, Google's cloud clients: a
    file of protobuf's brings none of them."""
    assert device_wheels.needed_distributions(files(google.protobuf)) == {}


def test_a_slimmed_wheel_installs_without_what_was_left_out(tmp_path):
    """Ray's wheel is carried without its Java jar: the files go, and so do their lines in
    the RECORD pip installs from; everything else is kept byte for byte."""
    import zipfile

    wheel = tmp_path / "demo-1.0-py3-none-any.whl"
    files = {"demo/__init__.py": b"VALUE = 1\n", "demo/jars/big.jar": b"\0" * 4096,
             "demo/ui/main.js.map": b"{}", "demo/ui/main.js": b"x"}
    record = "".join(f"{name},,\n" for name in [*files, "demo-1.0.dist-info/METADATA",
                                                   "demo-1.0.dist-info/WHEEL",
                                                   "demo-1.0.dist-info/RECORD"])
    with zipfile.ZipFile(wheel, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr("demo-1.0.dist-info/METADATA",
                   "Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n")
        z.writestr("demo-1.0.dist-info/WHEEL",
                   "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("demo-1.0.dist-info/RECORD", record)

    device_wheels.slimmed(wheel, left_out=("demo/jars/", ".js.map"))

    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        kept_record = z.read("demo-1.0.dist-info/RECORD").decode()
        assert z.read("demo/__init__.py") == files["demo/__init__.py"]
    assert "demo/jars/big.jar" not in names and "demo/ui/main.js.map" not in names
    assert {"demo/__init__.py", "demo/ui/main.js"} <= names
    assert "jars" not in kept_record and ".js.map" not in kept_record
    assert "demo/ui/main.js," in kept_record
    target = tmp_path / "site"
    pip_install(wheel, target)
    assert (target / "demo/__init__.py").read_text() == "VALUE = 1\n"
    assert not (target / "demo/jars").exists()


def test_the_stand_in_for_litert_imports_and_refuses_to_run(tmp_path):
    """With Ray, `ai_edge_litert` travels as a stand-in: installed like any wheel, it
    lets magenta_rt.musiccoca import (its mock is all random weights use), and says
    what it is if MusicCoCa itself is asked to run."""

    wheel = device_wheels.write_stand_in(tmp_path)
    target = tmp_path / "site"
    pip_install(wheel, target)
    probe = ("from ai_edge_litert.interpreter import Interpreter\n"
             "import importlib.metadata as m; print(m.version('ai-edge-litert'))\n"
             "Interpreter(model_path='x')\n")
    ran = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env={"PYTHONPATH": str(target)})
    assert ran.stdout.strip() == "0.0.0+stand.in"
    assert "RuntimeError: ai_edge_litert is a stand-in on this box" in ran.stderr


def test_the_device_checks_engine_part_leaves_what_the_run_tool_brings_back(tmp_path):
    """scripts/device_check engine, dry-run on tiny: both engine reports (the profile and the
    programs' memory plans in the narrowed one), the traces copied flat, the log; no more
    than the 8 files, none deeper than the 2 folders, that come back from $OUT. A wrong
    part is refused."""
    root = pathlib.Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "WHEELS": "none",
           "CONFIG": "configs/tiny.yaml", "VARIANT": "tiny", "BUCKETS": "1,2",
           "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([str(root / "scripts/device_check"), "engine"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == ["device-check-engine.log", "engine-tiny-narrow.json",
                     "engine-tiny-wide.json", "trace-tiny-1.json.gz", "trace-tiny-2.json.gz"]
    assert all(p.is_file() for p in out.iterdir())
    narrow = json.loads((out / "engine-tiny-narrow.json").read_text())
    wide = json.loads((out / "engine-tiny-wide.json").read_text())
    assert [r["batch"] for r in narrow["results"]] == [1, 2]
    assert all(r["profile"]["steps"] == 5 for r in narrow["results"])
    assert "profile" not in wide["results"][0] and "program_memory_gb" not in wide["results"][0]
    # XLA's plans of each step, and once of tiny's forced runs (its context holds 16 and 4)
    plans = [r["program_memory_gb"] for r in narrow["results"]]
    assert [sorted(p) for p in plans] == [[f"step-{b}"] for b in (1, 2)]
    assert plans[1]["step-2"]["temp"] > plans[0]["step-1"]["temp"] > 0  # rows take room
    runs = narrow["run_memory_gb"]
    assert sorted(runs) == ["prefill-16", "prefill-4"] and "run_memory_gb" not in wide
    assert runs["prefill-16"]["temp"] > runs["prefill-4"]["temp"] > 0
    assert "engine done" in (out / "device-check-engine.log").read_text()
    refused = subprocess.run([str(root / "scripts/device_check"), "all"], env=env,
                             capture_output=True, text=True)
    assert refused.returncode == 2 and "usage: scripts/device_check engine|ray" in refused.stderr
