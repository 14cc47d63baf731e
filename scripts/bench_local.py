#!/usr/bin/env python3
"""Serving benchmark end to end on this one machine: starts a server on a config, waits
until the variant is ready, runs scripts/bench_serve.py against it, and stops the server.

    scripts/bench_local.py configs/serve.yaml --variant mrt2_base --random-weights \\
        [--buckets 2,8,32] [--ray] -- --sessions 1,8,16,32 --seconds 20 \\
        --chunk-seconds 2.0 --json out.json

Everything after `--` goes to bench_serve.py (its `--url`, `--variant` and `--wait-ready`
are set here). The server is `mrt-serve local` (one process, no Ray: what a GPU box with
JAX but no Ray runs; `--random-weights` reads no checkpoint files) or, with `--ray`, the
Serve graph itself (`serve run` on a Ray instance of its own, which it stops after: the
ingress, the proxy and the transport that production has, on one machine). One command
that fails in seconds, with the server's last words, when the server dies while its model
compiles, where a benchmark started beside it would wait out its whole timeout.
`--buckets` serves the variant with other batch buckets than the config's (each is a
compile of about 50 s cold for mrt2_base on a GPU: a short lease measures with fewer).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serve_app import logs  # noqa: E402
from serve_app.cli_args import positive_ints, seconds  # noqa: E402
from serve_app.config import load_app_config, read_config_file  # noqa: E402
from serve_app.ports import free_port  # noqa: E402

READY_TIMEOUT_S = 1800.0  # a cold mrt2_base replica compiles 5 buckets in 4-5 min


def stop(process: subprocess.Popen, grace_s: float = 60.0,
         sig: signal.Signals = signal.SIGTERM) -> None:
    """`sig` (the server stops its step loops first), then a kill if it hangs, said on
    stderr: a server that needed one did not stop as it should."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            print(f"bench_local: pid {process.pid} did not stop within {grace_s:g} s of "
                  f"{sig.name}; killing it", file=sys.stderr, flush=True)
            process.kill()
            process.wait()


def config_args(config: pathlib.Path, variant: str | None,
                sizes: list[int] | None) -> tuple[dict, dict]:
    """(the application's args, the file's http_options), read and checked as `mrt-serve
    local` does (the same application choice and named errors), with `variant` served
    with the bucket `sizes` (when given) and as many sessions as the largest holds (a
    replica serves no more sessions than its largest bucket)."""
    try:
        args, http = read_config_file(config)
    except ValueError as e:
        raise SystemExit(f"bench_local: {e}") from None
    if sizes:
        variants = args.get("variants") or []
        entry = next((v for v in variants if v.get("name") == variant), None)
        if entry is None:
            names = [v.get("name") for v in variants]
            raise SystemExit(f"bench_local: --variant: {variant!r} is not among {names}")
        entry["buckets"], entry["max_sessions"] = sizes, sizes[-1]
    return args, http


def local_server(config: pathlib.Path, args: argparse.Namespace, port: int,
                 folder: str) -> tuple[list[str], dict[str, str]]:
    """`mrt-serve local` on the config (a copy holding what it reads when the buckets
    change)."""
    if args.buckets:
        app_args, http = config_args(config, args.variant, args.buckets)
        config = pathlib.Path(folder) / config.name
        config.write_text(yaml.safe_dump({"http_options": http,
                                          "applications": [{"name": "bench", "args": app_args}]},
                                         sort_keys=False))
    command = [sys.executable, "-m", "serve_app.cli", "local", str(config),
               "--host", "127.0.0.1", "--port", str(port)]
    if args.variant:
        command += ["--variant", args.variant]
    if args.random_weights:
        command.append("--random-weights")
    return command, dict(os.environ)


def ray_server(config: pathlib.Path, args: argparse.Namespace, port: int,
               folder: str) -> tuple[list[str], dict[str, str]]:
    """`serve run` on a copy of the config's application: only `--variant` (the
    config's default and A/B split follow, as `mrt-serve local --variant` narrows them),
    its buckets, random weights if asked, on `port`; a Ray instance of its own
    (RAY_ADDRESS=local), started with the node variables scripts/serve sets."""
    from deployments.transport import NODE_ENV
    from serve_app.engine.tiny import write_named_repos

    app_args, _ = config_args(config, args.variant, args.buckets)
    try:
        narrowed = load_app_config(app_args, {}, only=[args.variant] if args.variant else ())
    except ValueError as e:
        raise SystemExit(f"bench_local: {e}") from None
    narrowed.random_weights = narrowed.random_weights or args.random_weights
    write_named_repos(narrowed.tiny_repos_to_write())  # as scripts/serve does
    copy = pathlib.Path(folder) / config.name
    copy.write_text(yaml.safe_dump({
        "proxy_location": "EveryNode",
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{"name": "bench", "route_prefix": "/",
                          "import_path": "deployments.app:build_app",
                          "args": narrowed.model_dump(mode="json", exclude_defaults=True)}],
    }, sort_keys=False))
    # unbuffered: what `serve run` printed reaches the pipe even if it has to be killed
    env = {**os.environ, **NODE_ENV, "RAY_ADDRESS": "local", "PYTHONUNBUFFERED": "1",
           "RAY_SERVE_LOG_TO_STDERR": os.environ.get("RAY_SERVE_LOG_TO_STDERR", "0")}
    return [sys.executable, "-m", "ray.serve.scripts", "run", str(copy)], env


def main() -> int:
    # A blocked or ignored signal stays so across fork and exec: started that way (as from
    # the full test suite's process), the `serve run` below never saw the SIGINT that
    # stops it and was killed 60 s later. The servers start with both signals as usual.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        usage="%(prog)s [CONFIG] [--variant NAME] [--random-weights] [--buckets N,N,...] "
              "[--ray] -- BENCH_SERVE_ARGS")
    parser.add_argument("config", nargs="?", type=pathlib.Path,
                        default=ROOT / "configs/tiny.yaml")
    parser.add_argument("--variant", default=None,
                        help="the config's variant to serve and measure (default: the "
                             "config's default variant, every variant served)")
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--buckets", type=positive_ints, default=None, metavar="N,N,...",
                        help="the variant's batch buckets instead of the config's, and "
                             "the largest as its max_sessions (needs --variant)")
    parser.add_argument("--ray", action="store_true",
                        help="serve through Ray Serve (`serve run`) instead of one process")
    parser.add_argument("--ready-timeout", type=seconds(), default=READY_TIMEOUT_S,
                        metavar="SECONDS")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args, bench_args = parser.parse_args(argv[:split]), argv[split + 1:]
    if args.buckets and not args.variant:
        parser.error("--buckets needs --variant (the variant whose buckets it sets)")
    logs.configure()  # progress lines of work done here (a tiny finetune written)
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        server = ray_server if args.ray else local_server
        command, env = server(args.config.resolve(), args, port, tmp)
        return serve_and_bench(command, env, port, args, bench_args)


def serve_and_bench(server_cmd: list[str], env: dict[str, str], port: int,
                    args: argparse.Namespace, bench_args: list[str]) -> int:
    """Starts the server, benchmarks it once ready, stops it; the benchmark's exit
    status, or 1 when the server died first."""
    bench_cmd = [sys.executable, str(ROOT / "scripts/bench_serve.py"),
                 "--url", f"ws://127.0.0.1:{port}", "--wait-ready", str(args.ready_timeout),
                 *(["--variant", args.variant] if args.variant else []), *bench_args]

    # The server's progress (initialising, "ready after N s") goes to our stderr as is;
    # it runs from the checkout (serve_app importable), the benchmark from here (its paths).
    server = subprocess.Popen(server_cmd, cwd=ROOT, env=env)
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
        # `serve run` shuts Serve and its Ray instance down on SIGINT (Ctrl-C)
        stop(server, sig=signal.SIGINT if args.ray else signal.SIGTERM)


if __name__ == "__main__":
    sys.exit(main())
