#!/usr/bin/env python3
"""Serving benchmark end to end on this one machine, without Ray: starts `mrt-serve local`
on a config, waits until the variant is ready, runs scripts/bench_serve.py against it,
and stops the server.

    scripts/bench_local.py configs/serve.yaml --variant mrt2_base --random-weights \\
        [--buckets 2,8,32] -- --sessions 1,8,16,32 --seconds 20 --chunk-seconds 2.0 \\
        --json out.json

Everything after `--` goes to bench_serve.py (its `--url`, `--variant` and `--wait-ready`
are set here). This is how serving is measured on a GPU box that has JAX but no Ray (the
device machines; `--random-weights` reads no checkpoint files): one command that fails in
seconds, with the server's last words, when the server dies while its model compiles,
where a benchmark started beside it would wait out its whole timeout. `--buckets` serves
the variant with other batch buckets than the config's (each is a compile of about 50 s
cold for mrt2_base on a GPU: a short lease measures with fewer).
"""

from __future__ import annotations

import argparse
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serve_app.config import read_config_file  # noqa: E402
from serve_app.ports import free_port  # noqa: E402

READY_TIMEOUT_S = 1800.0  # a cold mrt2_base replica compiles 5 buckets in 4-5 min


def stop(process: subprocess.Popen, grace_s: float = 60.0) -> None:
    """SIGTERM (the server stops its step loops first), then a kill if it hangs."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def with_buckets(config: pathlib.Path, variant: str, buckets: str, folder: str) -> pathlib.Path:
    """A copy of `config`'s first application (written in `folder`) that serves `variant`
    with `buckets` ("2,8,32") and as many sessions as the largest holds (a replica serves
    no more sessions than its largest bucket)."""
    try:
        sizes = sorted({int(b) for b in buckets.split(",")})
    except ValueError:
        sizes = []
    if not sizes or sizes[0] < 1:
        raise SystemExit(f"bench_local: --buckets: comma-separated batch sizes, got {buckets!r}")
    try:  # the application and file checks `mrt-serve local` makes, with its messages
        args, http = read_config_file(config)
    except ValueError as e:
        raise SystemExit(f"bench_local: {e}") from None
    variants = args.get("variants") or []
    entry = next((v for v in variants if v.get("name") == variant), None)
    if entry is None:
        names = [v.get("name") for v in variants]
        raise SystemExit(f"bench_local: --variant: {variant!r} is not among {names}")
    entry["buckets"], entry["max_sessions"] = sizes, sizes[-1]
    copy = pathlib.Path(folder) / config.name
    # all `mrt-serve local` reads: the application's args and the file's http_options
    copy.write_text(yaml.safe_dump({"http_options": http,
                                    "applications": [{"name": "bench", "args": args}]},
                                   sort_keys=False))
    return copy


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        usage="%(prog)s [CONFIG] [--variant NAME] [--random-weights] [--buckets N,N,...] "
              "-- BENCH_SERVE_ARGS")
    parser.add_argument("config", nargs="?", type=pathlib.Path,
                        default=ROOT / "configs/tiny.yaml")
    parser.add_argument("--variant", default=None,
                        help="the config's variant to serve and measure (default: the "
                             "config's default variant, every variant served)")
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--buckets", default=None, metavar="N,N,...",
                        help="the variant's batch buckets instead of the config's, and "
                             "the largest as its max_sessions (needs --variant)")
    parser.add_argument("--ready-timeout", type=float, default=READY_TIMEOUT_S,
                        metavar="SECONDS")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args, bench_args = parser.parse_args(argv[:split]), argv[split + 1:]
    if args.buckets and not args.variant:
        parser.error("--buckets needs --variant (the variant whose buckets it sets)")
    with tempfile.TemporaryDirectory() as tmp:
        config = args.config.resolve()
        if args.buckets:
            config = with_buckets(config, args.variant, args.buckets, tmp)
        return serve_and_bench(config, args, bench_args)


def serve_and_bench(config: pathlib.Path, args: argparse.Namespace,
                    bench_args: list[str]) -> int:
    """Starts the server on `config`, benchmarks it once ready, stops it; the benchmark's
    exit status, or 1 when the server died first."""
    port = free_port()
    server_cmd = [sys.executable, "-m", "serve_app.cli", "local", str(config),
                  "--host", "127.0.0.1", "--port", str(port)]
    if args.variant:
        server_cmd += ["--variant", args.variant]
    if args.random_weights:
        server_cmd.append("--random-weights")
    bench_cmd = [sys.executable, str(ROOT / "scripts/bench_serve.py"),
                 "--url", f"ws://127.0.0.1:{port}", "--wait-ready", str(args.ready_timeout),
                 *(["--variant", args.variant] if args.variant else []), *bench_args]

    # The server's progress (initialising, "ready after N s") goes to our stderr as is;
    # it runs from the checkout (serve_app importable), the benchmark from here (its paths).
    server = subprocess.Popen(server_cmd, cwd=ROOT)
    bench = None
    try:
        bench = subprocess.Popen(bench_cmd)
        while bench.poll() is None:
            if server.poll() is not None:
                print(f"bench_local: the server exited (status {server.returncode}) before "
                      "the benchmark ended; its output is above", file=sys.stderr)
                return 1
            time.sleep(0.5)
        return bench.returncode
    finally:
        if bench is not None:
            stop(bench, grace_s=5)
        stop(server)


if __name__ == "__main__":
    sys.exit(main())
