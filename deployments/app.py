"""The application builder named by configs/*.yaml (`import_path: deployments.app:build_app`).

One Generator deployment per configured variant, a StyleEmbedder and the Ingress.
Generators ask Ray for the config's CPUs and GPUs fitted to the cluster
(`deployments/placement.py`): a config sized for GPU hosts runs on one GPU box, or on
none, and says so, instead of leaving replicas waiting for resources that never come.
The prototype's boot variables MRT_CKPT_REPO, MRT_CKPT_STEP and MRT_SIZE set the default
variant's model.
"""

from __future__ import annotations

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig

from serve_app.config import AppConfig, VariantConfig, load_app_config

from .generator import Generator
from .ingress import Ingress
from .placement import (
    INGRESS_CPUS,
    STYLE_EMBEDDER_CPUS,
    Placement,
    as_configured,
    fit_to_cluster,
)
from .style_embedder import StyleEmbedder
from .transport import GRPC_ENV

# Every replica: JAX on CPU unless it is a GPU generator, and Serve's gRPC data plane
# (deployments/transport.py).
CPU_ENV = {"JAX_PLATFORMS": "cpu", **GRPC_ENV}
# The chunk path's replicas (Ingress, Generators) run our async code on Ray Serve's own
# event loop, and their handles' router on it too, instead of one extra thread each:
# each chunk crosses two thread hops fewer. Measured with scripts/bench_serve.py (tiny,
# 2-core box, 0.5 s chunks; median of the runs' overhead p50): 8 sessions 11.7 -> 8.7 ms
# (4 runs before, 2 after); 1, 2 and 4 sessions within run-to-run noise. Our async
# methods never block (slow work runs in threads: the step loop, asyncio.to_thread).
#
# They also reply inline up to 4 MiB (Ray's default is 100 KiB; a 2 s pcm16 stereo chunk is
# 384 KB, a 10 s one as base64 JSON 2.6 MB): above the limit every chunk went through the
# object store, on the generator -> ingress hop and again on the ingress -> proxy one.
# bench_serve, 2 s chunks, overhead p50: 1 session 9.9 -> 8.4 ms, 8 sessions 24.6 -> 13.3
# (docs/performance.md). A per-process Ray setting: only these replicas' replies change.
# Over the gRPC data plane (deployments/transport.py) replies are no Ray objects; the
# limit still serves a proxy started without NODE_ENV, which calls the ingress by actor.
CHUNK_PATH_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_max_direct_call_object_size": str(4 * 1024 * 1024),
}
# How often a stopping replica looks whether its requests have drained (Serve's default,
# 2 s, is also the least time any replica takes to stop): a look is cheap, and a replica
# that stops (scale-down, redeploy, delete) frees its resources that much sooner.
SHUTDOWN_POLL_S = 0.25
# GPU replicas allocate as they go rather than grabbing 75% of the GPU up front.
GPU_ENV = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "JAX_PLATFORMS": "cuda,cpu", **GRPC_ENV}


def _cluster_nodes() -> list[dict]:
    """The resources of each live node; none when not connected (assume nothing rather
    than wait)."""
    try:
        if not ray.is_initialized():
            return []
        return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    except Exception:
        return []


def generator_options(v: VariantConfig, placement: Placement) -> dict:
    """Serve options of one variant's Generator deployment, its replicas placed as given."""
    env = {**(GPU_ENV if placement.num_gpus else CPU_ENV), **CHUNK_PATH_ENV}
    options = dict(
        name=f"Generator_{v.name}",
        ray_actor_options={"num_gpus": placement.num_gpus, "num_cpus": placement.num_cpus,
                           "runtime_env": {"env_vars": env}},
        max_ongoing_requests=v.max_ongoing_requests,
        request_router_config=RequestRouterConfig(
            request_router_class="deployments.routing:SessionAffinityRouter"
        ),
        # sessions end when their replica stops: let streams finish on scale-down
        graceful_shutdown_timeout_s=60,
        graceful_shutdown_wait_loop_s=SHUTDOWN_POLL_S,
        # Its callers are our own Ingress, which logs the client's requests: a line per
        # chunk here (2 a second per 0.5 s-chunk session) would drown the replica's log.
        # Errors are still logged.
        logging_config={"enable_access_log": False},
    )
    if v.autoscaling_config:
        options["autoscaling_config"] = dict(v.autoscaling_config)
        if placement.max_replicas is not None:
            options["autoscaling_config"]["max_replicas"] = placement.max_replicas
    else:
        options["num_replicas"] = v.num_replicas
    return options


def _generator(config: AppConfig, v: VariantConfig, placement: Placement):
    options = generator_options(v, placement)
    return Generator.options(**options).bind(v.name, v.model_variant,
                                             config.generator_options(v))


def build_app(args: dict) -> serve.Application:
    config = load_app_config(args)
    placements = (fit_to_cluster(config, _cluster_nodes()) if config.fit_to_cluster
                  else as_configured(config))
    generators = {v.name: _generator(config, v, placements[v.name]) for v in config.variants}
    styles = StyleEmbedder.options(
        ray_actor_options={"num_cpus": STYLE_EMBEDDER_CPUS,
                           "runtime_env": {"env_vars": CPU_ENV}},
        graceful_shutdown_wait_loop_s=SHUTDOWN_POLL_S,
    ).bind(config.style_mock, config.style_embedder.repo)
    ingress_opts = {"max_ongoing_requests": 2000, "num_replicas": 1,
                    "graceful_shutdown_wait_loop_s": SHUTDOWN_POLL_S, **config.ingress}
    return Ingress.options(
        ray_actor_options={"num_cpus": INGRESS_CPUS,
                           "runtime_env": {"env_vars": {**CPU_ENV, **CHUNK_PATH_ENV}}},
        **ingress_opts,
    ).bind(generators, styles, config.api_config)
