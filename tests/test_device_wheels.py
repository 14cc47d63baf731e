"""scripts/device_wheels.py: which installed distributions a GPU box without Ray is sent.

The download itself needs PyPI and the traced run is the bench_local path that
test_standalone runs; here, the mapping from loaded files to distributions that decides
what is carried."""

from __future__ import annotations

import importlib.metadata as metadata
import importlib.util
import os
import pathlib

import fastapi
import google.protobuf
import numpy
import websockets

import serve_app

ROOT = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("device_wheels", ROOT / "scripts/device_wheels.py")
device_wheels = importlib.util.module_from_spec(spec)
spec.loader.exec_module(device_wheels)


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
