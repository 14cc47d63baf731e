#!/usr/bin/env python3
"""Downloads into `.whl/` the wheels a GPU box without Ray needs to run the serving benchmark
(`scripts/bench_local.py`, docs/performance.md): the distributions that the one-process server
and bench_serve.py import, less those the device image already holds.

    .venv/bin/python scripts/device_wheels.py [--out .whl] [--python-version 3.12]

What is imported is found by running that path here on `tiny` (random weights, 1 session,
2 s): every Python process of it writes the modules it loaded when it exits, and each
module maps to the distribution installed here that provides it. Importing the packages
alone would miss those loaded on first use (uvicorn's WebSocket protocol, python-multipart,
soxr). The wheels are this venv's versions built for the device's Python (3.12, x86-64
manylinux), fetched from PyPI with `--no-deps`: every dependency that is imported is named
itself. `.whl/` is git-ignored; stop 19 carried 26 wheels, 32 MB, against the 64 MiB limit.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import json
import os
import pathlib
import subprocess
import sys
import tempfile

from packaging.utils import canonicalize_name

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The device image's packages, which are not carried (one per line; `#` starts a comment).
DEVICE_PACKAGES = pathlib.Path(__file__).with_name("device_image_packages.txt")
OURS = "mrt-serve"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")

# Written as sitecustomize.py on the traced processes' path: at exit, each appends the
# files of the modules it loaded to $MRT_TRACE_IMPORTS (one JSON list a line). Files, not
# names: a namespace package ("google", "opentelemetry") spans several distributions.
TRACER = """
import atexit, json, os, sys

def _dump():
    files = {getattr(m, "__file__", None) for m in list(sys.modules.values())}
    with open(os.environ["MRT_TRACE_IMPORTS"], "a") as f:
        f.write(json.dumps(sorted(os.path.realpath(p) for p in files if p)) + "\\n")

atexit.register(_dump)
"""


def imported_files() -> set[str]:
    """The files of the modules loaded by the one-process server and bench_serve.py, serving
    tiny for 2 s (the device command's path, on a smaller model)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = pathlib.Path(tmp)
        (tmp_path / "sitecustomize.py").write_text(TRACER)
        trace = tmp_path / "imports.jsonl"
        env = {**os.environ, "MRT_TRACE_IMPORTS": str(trace), "JAX_PLATFORMS": "cpu",
               "PYTHONPATH": os.pathsep.join(filter(None, [tmp, os.environ.get("PYTHONPATH")]))}
        print("==> serving tiny for 2 s to see what is imported ...", file=sys.stderr,
              flush=True)
        subprocess.run(
            [sys.executable, str(ROOT / "scripts/bench_local.py"), "configs/tiny.yaml",
             "--variant", "tiny", "--random-weights", "--", "--sessions", "1", "--seconds",
             "2", "--chunk-seconds", "0.5", "--json", str(tmp_path / "bench.json")],
            cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL,
        )
        lines = trace.read_text().splitlines()
    if len(lines) < 3:  # bench_local, the server, bench_serve
        raise SystemExit(f"device_wheels: expected 3 traced processes, got {len(lines)}")
    return {path for line in lines for path in json.loads(line)}


def needed_distributions(files: set[str]) -> dict[str, str]:
    """{distribution: version installed here} of the distributions that own the files,
    less the device image's packages and this project (the standard library is owned by
    none)."""
    lines = DEVICE_PACKAGES.read_text().splitlines()
    device_has = {canonicalize_name(line.strip()) for line in lines
                  if line.strip() and not line.startswith("#")}
    needed = {}
    for dist in metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        if name in device_has or name == OURS:
            continue
        owned = {os.path.realpath(dist.locate_file(f)) for f in dist.files or ()}
        if owned & files:
            needed[name] = dist.version
    return dict(sorted(needed.items()))


def download(needed: dict[str, str], out: pathlib.Path, python_version: str) -> None:
    out.mkdir(exist_ok=True)
    for stale in out.glob("*.whl"):
        stale.unlink()  # two versions of one package stop the whole install there
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
         "--only-binary=:all:", "--python-version", python_version, "--implementation", "cp",
         *platforms, "--dest", str(out), *(f"{name}=={v}" for name, v in needed.items())],
        check=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / ".whl")
    parser.add_argument("--python-version", default="3.12", help="the device's Python")
    args = parser.parse_args()
    needed = needed_distributions(imported_files())
    print("==> downloading " + ", ".join(f"{n}=={v}" for n, v in needed.items()),
          file=sys.stderr, flush=True)
    download(needed, args.out, args.python_version)
    wheels = sorted(args.out.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels) / 2**20
    print(f"{len(wheels)} wheels, {size:.1f} MiB in {args.out} (carry limit 64 MiB with the "
          "working tree)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
