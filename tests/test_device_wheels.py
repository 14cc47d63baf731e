"""scripts/device_wheels.py: which installed distributions a GPU box is sent, and the
wheels made for it (Ray slimmed, the stand-in for ai_edge_litert).

The download itself needs PyPI and the traced run is the bench_local path that
test_standalone runs; here, the mapping from loaded files to distributions that decides
what is carried."""

from __future__ import annotations

import importlib.metadata as metadata
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
