"""The application builder named by configs/*.yaml (`import_path: deployments.app:build_app`).

One Generator deployment per configured variant, a StyleEmbedder and the Ingress.
A config that asks for GPUs on a cluster without any runs on CPU and says so
(nothing hangs waiting for a GPU that will never come). The prototype's boot
variables MRT_CKPT_REPO, MRT_CKPT_STEP and MRT_SIZE set the default variant's model.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping

import ray
from pydantic import BaseModel, Field, field_validator
from ray import serve
from ray.serve.config import RequestRouterConfig

from serve_app.api.ab import ABSplit
from serve_app.engine.variants import VARIANTS, variant_for_size

from .generator import Generator
from .ingress import Ingress
from .style_embedder import StyleEmbedder
from .transport import GRPC_ENV

log = logging.getLogger("mrt_serve.app")

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
# GPU replicas allocate as they go rather than grabbing 75% of the GPU up front.
GPU_ENV = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "JAX_PLATFORMS": "cuda,cpu", **GRPC_ENV}


class VariantConfig(BaseModel):
    name: str
    variant: str | None = None  # model variant; defaults to `name`
    repo: str | None = None
    step: int | None = Field(None, ge=0)
    compute_dtype: str = "auto"
    max_sessions: int = Field(16, ge=1)
    buckets: list[int] | None = None
    num_gpus: float = Field(0.0, ge=0)
    num_cpus: float = Field(1.0, ge=0)
    num_replicas: int | str = 1
    autoscaling_config: dict | None = None
    max_ongoing_requests: int = Field(256, ge=1)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", v):
            raise ValueError("variant names use letters, digits, '_' and '-' only")
        return v

    @field_validator("variant")
    @classmethod
    def _variant(cls, v: str | None) -> str | None:
        return None if v is None else variant_for_size(v)

    @property
    def model_variant(self) -> str:
        return self.variant or self.name


class AppConfig(BaseModel):
    variants: list[VariantConfig]
    default_variant: str | None = None
    # A/B split of sessions that name no variant: weight per variant, sticky per client id
    ab_split: dict[str, float] | None = None
    style_embedder: dict = Field(default_factory=dict)  # {mock: bool, repo: str}
    ingress: dict = Field(default_factory=dict)  # {num_replicas, max_ongoing_requests}
    api: dict = Field(default_factory=dict)


SIDE_CPUS = 1.0  # Ingress and StyleEmbedder, 0.5 each


def _cluster_resources() -> dict:
    try:
        return ray.cluster_resources() if ray.is_initialized() else {}
    except Exception:  # not connected: assume nothing rather than wait
        return {}


def generator_options(v: VariantConfig, resources: dict, n_generators: int) -> dict:
    """Serve options of one variant's Generator deployment on a cluster with `resources`."""
    if v.model_variant not in VARIANTS:
        raise ValueError(f"variants[{v.name}].variant: unknown model variant {v.model_variant!r}")
    num_gpus, num_cpus = v.num_gpus, v.num_cpus
    if num_gpus and not resources.get("GPU"):
        # CPU requests in a GPU config are sized for a GPU host; scale them to what this
        # cluster has so that every replica can be placed instead of waiting forever.
        cpus = resources.get("CPU")
        if cpus:
            num_cpus = min(num_cpus, max(0.1, (cpus - SIDE_CPUS) / n_generators))
        log.warning(
            "config asks for %s GPU(s) for Generator_%s but this Ray cluster has no GPU: "
            "running it on CPU with %.2g CPU(s) (expect it to be far slower than real time "
            "for real models)",
            num_gpus, v.name, num_cpus,
        )
        num_gpus = 0.0
    env = {**(GPU_ENV if num_gpus else CPU_ENV), **CHUNK_PATH_ENV}
    options = dict(
        name=f"Generator_{v.name}",
        ray_actor_options={"num_gpus": num_gpus, "num_cpus": num_cpus,
                           "runtime_env": {"env_vars": env}},
        max_ongoing_requests=v.max_ongoing_requests,
        request_router_config=RequestRouterConfig(
            request_router_class="deployments.routing:SessionAffinityRouter"
        ),
        # sessions end when their replica stops: let streams finish on scale-down
        graceful_shutdown_timeout_s=60,
        # Its callers are our own Ingress, which logs the client's requests: a line per
        # chunk here (2 a second per 0.5 s-chunk session) would drown the replica's log.
        # Errors are still logged.
        logging_config={"enable_access_log": False},
    )
    if v.autoscaling_config:
        options["autoscaling_config"] = v.autoscaling_config
    else:
        options["num_replicas"] = v.num_replicas
    return options


def _generator(v: VariantConfig, resources: dict, n_generators: int):
    options = generator_options(v, resources, n_generators)
    core_options = {
        "repo": v.repo, "step": v.step, "max_sessions": v.max_sessions,
        "compute_dtype": v.compute_dtype,
        "buckets": tuple(v.buckets) if v.buckets else None,
    }
    return Generator.options(**options).bind(v.name, v.model_variant, core_options)


def apply_boot_env(config: AppConfig, environ: Mapping[str, str] = os.environ) -> None:
    """MRT_CKPT_REPO / MRT_CKPT_STEP / MRT_SIZE choose the default variant's boot model
    (the prototype's way to boot a finetune); a later /model/select overrides them."""
    repo, step, size = (environ.get(k, "").strip()
                        for k in ("MRT_CKPT_REPO", "MRT_CKPT_STEP", "MRT_SIZE"))
    if not (repo or step or size):
        return
    target = next(v for v in config.variants if v.name == config.default_variant)
    if repo:
        target.repo = repo
    if step:
        if not step.isdigit():
            raise ValueError(f"MRT_CKPT_STEP: a checkpoint step number, got {step!r}")
        target.step = int(step)
    if size:
        target.variant = variant_for_size(size)
    log.info("boot model of %s from the environment: size %s, repo %s, step %s",
             target.name, target.model_variant, target.repo, target.step)


def build_app(args: dict) -> serve.Application:
    config = AppConfig(**args)
    if not config.variants:
        raise ValueError("variants: list at least one model variant to serve")
    names = [v.name for v in config.variants]
    config.default_variant = config.default_variant or names[0]
    if config.default_variant not in names:
        raise ValueError(f"default_variant: {config.default_variant!r} is not among {names}")
    if config.ab_split is not None:
        ABSplit(config.ab_split, names)  # validates names and weights
    apply_boot_env(config)
    resources = _cluster_resources()
    generators = {
        v.name: _generator(v, resources, len(config.variants)) for v in config.variants
    }
    api = {"default_variant": config.default_variant, "ab_split": config.ab_split, **config.api}
    mock = config.style_embedder.get(
        "mock", all(v.model_variant == "tiny" for v in config.variants)
    )
    styles = StyleEmbedder.options(
        ray_actor_options={"num_cpus": 0.5, "runtime_env": {"env_vars": CPU_ENV}},
    ).bind(mock, config.style_embedder.get("repo"))
    ingress_opts = {"max_ongoing_requests": 2000, "num_replicas": 1, **config.ingress}
    return Ingress.options(
        ray_actor_options={"num_cpus": 0.5,
                           "runtime_env": {"env_vars": {**CPU_ENV, **CHUNK_PATH_ENV}}},
        **ingress_opts,
    ).bind(generators, styles, api)
