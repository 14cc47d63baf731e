"""One process, no Ray: the same API and the same configs over in-process generators.

`mrt-serve local [config]` serves a config's application from this one process: the
FastAPI app the Ingress builds, each variant's GeneratorCore and the style embedder as
plain objects, uvicorn in front. It is for one machine (a workstation, a GPU box without
Ray) and for measuring what Ray Serve's hops cost; it gives up what Ray is there for:
replicas, autoscaling, a cluster, a model switch that outlives the process. The Ray-only
fields of a config (replicas, CPUs, GPUs, autoscaling, ingress) are ignored, and
the application is served at `/` whatever its `route_prefix`.

Measured with scripts/bench_serve.py (tiny, 2-core box, sessions started together, the two
alternated; docs/performance.md): serving overhead p50 0.7-1.6 ms at 1-8 sessions with 0.5 s
chunks and 1.5-2.9 ms with 2 s chunks, against 3.4-8.1 and 5.6-13.2 ms through Ray Serve's
proxy, ingress and generator replicas; the engine's step time is the same in both.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Sequence

from fastapi import FastAPI

from .api.app import create_app
from .api.security import open_to_the_network
from .api.settings import ApiSettings, ws_max_message_bytes
from .config import AppConfig, load_app_config, read_config_file
from .engine.tiny import write_named_repos
from .generator import GeneratorCore
from .styles.service import StyleEmbedderCore


def build_generators(config: AppConfig) -> dict[str, GeneratorCore]:
    """One GeneratorCore per variant, each loading and compiling in its own thread."""
    return {v.name: GeneratorCore(v.model_variant, name=v.name, **config.generator_options(v))
            for v in config.variants}


def build_app(config: AppConfig, generators: dict[str, GeneratorCore],
              settings: ApiSettings | None = None) -> FastAPI:
    """The API over in-process generators (`settings`: the config's `api:`, by default)."""
    styles = StyleEmbedderCore(config.style_mock, config.style_embedder.repo)
    return create_app(generators, styles,
                      settings or ApiSettings.from_config(config.api_config))


@contextlib.contextmanager
def _sigterm_exits():
    """SIGTERM ends the process through SystemExit, so that `finally` blocks run. uvicorn
    shuts the server down gracefully on SIGTERM and then raises the signal again with the
    handler it found installed: by default a kill that would skip stopping the step loops."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def exit_(signum, frame):
        raise SystemExit(0)

    previous = signal.signal(signal.SIGTERM, exit_)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def serve(config_path: str | os.PathLike, *, app_name: str | None = None,
          host: str | None = None, port: int | None = None,
          random_weights: bool = False, variants: Sequence[str] = ()) -> None:
    """Serves until SIGINT/SIGTERM, then stops every generator's step loop; `variants`
    names the config's variants to serve (default: all). Raises ValueError, naming the
    field, for a config that cannot be served."""
    import uvicorn

    args, http = read_config_file(config_path, app_name)
    config = load_app_config(args, only=variants)
    config.random_weights = config.random_weights or random_weights
    write_named_repos(config.tiny_repos_to_write())
    host = host or http.get("host", "127.0.0.1")
    port = port if port is not None else int(http.get("port", 8000))
    generators: dict[str, GeneratorCore] = {}
    with _sigterm_exits():
        try:
            if config.random_weights:
                print("mrt-serve local: random weights, no checkpoint files: initialising "
                      f"{', '.join(v.model_variant for v in config.variants)} ...",
                      file=sys.stderr, flush=True)
            generators = build_generators(config)
            settings = ApiSettings.from_config(config.api_config)
            app = build_app(config, generators, settings)
            if warning := open_to_the_network(host, settings):
                print(f"mrt-serve local: warning: {warning}", file=sys.stderr, flush=True)
            print(f"mrt-serve local: http://{host}:{port} serving {', '.join(generators)} "
                  "(/health shows readiness)", file=sys.stderr, flush=True)
            # PCM does not compress: no permessage-deflate (deployments/proxy.py does the
            # same for Serve's proxy). log_config=None keeps our quiet key=value logging.
            uvicorn.run(app, host=host, port=port, ws_per_message_deflate=False,
                        ws_max_size=ws_max_message_bytes(settings.max_upload_bytes),
                        log_config=None, access_log=False)
        except KeyboardInterrupt:
            pass  # Ctrl-C: uvicorn has already shut the server down gracefully
        finally:
            for core in generators.values():
                core.shutdown()
            if generators:
                print("mrt-serve local: stopped", file=sys.stderr, flush=True)
