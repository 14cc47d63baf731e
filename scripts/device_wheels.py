#!/usr/bin/env python3
"""Downloads into `.whl/` the wheels a GPU box without Ray needs to run the serving benchmark
(`scripts/bench_local.py`, docs/performance.md): the distributions that the one-process server
and bench_serve.py import, less those the device image already holds.

    .venv/bin/python scripts/device_wheels.py [--out .whl] [--python-version 3.12] [--ray]

`--ray` also writes `.whl-ray/`: all that serving through Ray (`bench_local.py --ray`)
imports, on its own: Ray in a slimmed wheel (`slimmed`) and, in place of `ai_edge_litert`
(21 MB, which MusicCoCa needs and random weights do not), a stand-in that refuses to run
(`write_stand_in`), so that the whole fits one call's 64 MiB with the working tree.

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
import zipfile

from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The device image's packages, which are not carried (one per line; `#` starts a comment).
DEVICE_PACKAGES = pathlib.Path(__file__).with_name("device_image_packages.txt")
OURS = "mrt-serve"
# Left out of Ray's wheel, which (79 MB) would not fit a call: the Java workers' jar (31 MB
# compressed) and the dashboard's JavaScript source map; a Python-only cluster loads neither.
RAY_LEFT_OUT = ("ray/jars/", ".js.map")
# Carried as a stand-in with Ray (`write_stand_in`): the real one is 21 of `.whl`'s 32 MiB.
STAND_IN = "ai-edge-litert"
STAND_IN_INTERPRETER = '''"""Stand-in for ai_edge_litert on a GPU box that serves random weights
through Ray (scripts/device_wheels.py --ray): importable, so that magenta_rt.musiccoca
(and its MockMusicCoCa) imports; MusicCoCa itself cannot run."""


class Interpreter:
    def __init__(self, *args, **kwargs):
        raise RuntimeError(
            "ai_edge_litert is a stand-in on this box (scripts/device_wheels.py --ray): "
            "MusicCoCa cannot run here; serve with random weights and mock styles")
'''
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")

# Written as sitecustomize.py on the traced processes' path: each writes the files of the
# modules it has loaded to $MRT_TRACE_IMPORTS/<pid>.json every half second and at exit (Ray
# kills its dashboard and agents at shutdown: an exit hook alone would miss them). Files,
# not names: a namespace package ("google", "opentelemetry") spans several distributions.
TRACER = """
import atexit, json, os, sys, threading, time

def _dump():
    files = {getattr(m, "__file__", None) for m in list(sys.modules.values())}
    path = os.path.join(os.environ["MRT_TRACE_IMPORTS"], f"{os.getpid()}.json")
    part = f"{path}.{threading.get_ident()}"  # the exit hook and the thread may overlap
    with open(part, "w") as f:
        json.dump(sorted(os.path.realpath(p) for p in files if isinstance(p, str)), f)
    os.replace(part, path)

def _every_half_second():
    while True:
        time.sleep(0.5)
        try:
            _dump()
        except Exception:
            pass

atexit.register(_dump)
threading.Thread(target=_every_half_second, daemon=True).start()
"""


def imported_files(through_ray: bool = False) -> set[str]:
    """The files of the modules loaded by the one-process server (or, `through_ray`, the
    Serve graph's processes: driver, controller, proxy, replicas) and bench_serve.py,
    serving tiny for 2 s (the device command's path, on a smaller model)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = pathlib.Path(tmp)
        (tmp_path / "sitecustomize.py").write_text(TRACER)
        trace = tmp_path / "imports"
        trace.mkdir()
        env = {**os.environ, "MRT_TRACE_IMPORTS": str(trace), "JAX_PLATFORMS": "cpu",
               "PYTHONPATH": os.pathsep.join(filter(None, [tmp, os.environ.get("PYTHONPATH")]))}
        how = "through Ray" if through_ray else "in one process"
        print(f"==> serving tiny {how} for 2 s to see what is imported ...", file=sys.stderr,
              flush=True)
        subprocess.run(
            [sys.executable, str(ROOT / "scripts/bench_local.py"), "configs/tiny.yaml",
             "--variant", "tiny", "--random-weights", *(["--ray"] if through_ray else []),
             "--", "--sessions", "1", "--seconds", "2", "--chunk-seconds", "0.5", "--json",
             str(tmp_path / "bench.json")],
            cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL if through_ray else None,
        )
        dumps = [json.loads(f.read_text()) for f in trace.glob("*.json")]
    if len(dumps) < 3:  # bench_local, the server, bench_serve
        raise SystemExit(f"device_wheels: expected 3 traced processes, got {len(dumps)}")
    return {path for dump in dumps for path in dump}


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
    print("==> downloading " + ", ".join(f"{n}=={v}" for n, v in needed.items()),
          file=sys.stderr, flush=True)
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


def slimmed(wheel: pathlib.Path, left_out: tuple[str, ...] = RAY_LEFT_OUT) -> None:
    """Rewrites `wheel` without the files whose names start or end with one of
    `left_out`, and without their lines in its RECORD (the list of the wheel's files
    that pip installs from)."""
    def kept(name: str) -> bool:
        return not any(name.startswith(x) or name.endswith(x) for x in left_out)

    slim = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(
            slim, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        for info in src.infolist():
            if not kept(info.filename):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = b"".join(line for line in data.splitlines(keepends=True)
                                if kept(line.split(b",", 1)[0].decode()))
            dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    slim.replace(wheel)


def write_stand_in(out: pathlib.Path) -> pathlib.Path:
    """A wheel of `ai_edge_litert` whose `Interpreter` refuses to run, in place of the real
    one (21 MB), for which a call carrying Ray has no room: `magenta_rt.musiccoca` imports
    it where its mock lives too, and a benchmark on random weights uses only the mock."""
    name = f"{STAND_IN.replace('-', '_')}-0.0.0+stand.in"
    files = {
        "ai_edge_litert/__init__.py": '"""Stand-in (scripts/device_wheels.py --ray)."""\n',
        "ai_edge_litert/interpreter.py": STAND_IN_INTERPRETER,
        f"{name}.dist-info/METADATA":
            f"Metadata-Version: 2.1\nName: {STAND_IN}\nVersion: 0.0.0+stand.in\n",
        f"{name}.dist-info/WHEEL":
            "Wheel-Version: 1.0\nGenerator: device_wheels\nRoot-Is-Purelib: true\n"
            "Tag: py3-none-any\n",
    }
    record = "".join(f"{path},,\n" for path in [*files, f"{name}.dist-info/RECORD"])
    wheel = out / f"{name}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        for path, text in files.items():
            z.writestr(path, text)
        z.writestr(f"{name}.dist-info/RECORD", record)
    return wheel


def report(out: pathlib.Path) -> None:
    wheels = sorted(out.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels) / 2**20
    print(f"{len(wheels)} wheels, {size:.1f} MiB in {out} (a call carries 64 MiB with the "
          "working tree)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / ".whl")
    parser.add_argument("--python-version", default="3.12", help="the device's Python")
    parser.add_argument("--ray", action="store_true",
                        help="also write OUT-ray/: all that serving through Ray needs")
    args = parser.parse_args()
    needed = needed_distributions(imported_files())
    download(needed, args.out, args.python_version)
    report(args.out)
    if args.ray:
        ray_out = args.out.with_name(args.out.name + "-ray")
        wanted = {**needed, **needed_distributions(imported_files(through_ray=True))}
        wanted.pop(STAND_IN, None)
        download(wanted, ray_out, args.python_version)
        for wheel in ray_out.glob("*.whl"):
            if parse_wheel_filename(wheel.name)[0] == "ray":
                slimmed(wheel)
        write_stand_in(ray_out)
        report(ray_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
