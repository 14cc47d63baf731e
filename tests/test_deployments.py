"""Builder, configs and autoscaling policy of the Ray Serve graph (no cluster needed)."""

from __future__ import annotations

import base64
import pathlib

import numpy as np
import pytest
import yaml
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from deployments.app import build_app, generator_options
from deployments.autoscaling import SessionsPolicy
from deployments.proxy import PROXY_CALLBACK_ENV, without_ws_compression
from deployments.transport import GRPC_ENV, NODE_ENV
from serve_app.api.ws import WsParams
from serve_app.audio import to_wav_bytes
from serve_app.config import AppConfig, VariantConfig
from serve_app.frames import CHANNELS, SAMPLE_RATE

ROOT = pathlib.Path(__file__).resolve().parents[1]


def context(sessions: list[float], current: int, lo: int = 1, hi: int = 8):
    return AutoscalingContext(
        deployment_id=None, deployment_name="Generator_x", app_name="mrt",
        current_num_replicas=current, target_num_replicas=current, running_replicas=[],
        total_num_requests=0.0, total_queued_requests=0.0,
        aggregated_metrics={"sessions": {f"r{i}": n for i, n in enumerate(sessions)}},
        raw_metrics={}, capacity_adjusted_min_replicas=lo, capacity_adjusted_max_replicas=hi,
        policy_state={}, last_scale_up_time=None, last_scale_down_time=None,
        current_time=0.0, config=None,
    )


def test_sessions_policy_targets_sessions_per_replica_and_keeps_busy_replicas():
    policy = SessionsPolicy(target_sessions_per_replica=10)
    assert policy(context([10, 10], 2))[0] == 2
    assert policy(context([15, 14], 2))[0] == 3  # 29 sessions -> 3 replicas
    assert policy(context([1, 1, 1], 3))[0] == 3  # each replica holds a session
    assert policy(context([0, 0, 0], 3))[0] == 1  # idle: back to the minimum
    assert policy(context([200], 1))[0] == 8  # capped at max
    with pytest.raises(ValueError, match="target_sessions_per_replica"):
        SessionsPolicy(0)


@pytest.mark.parametrize("name", ["serve.yaml", "tiny.yaml"])
def test_configs_build_the_graph(name):
    config = yaml.safe_load((ROOT / "configs" / name).read_text())
    app = config["applications"][0]
    assert app["import_path"] == "deployments.app:build_app"
    args = AppConfig(**app["args"])
    for variant in args.variants:
        if variant.autoscaling_config:
            AutoscalingConfig(**variant.autoscaling_config)  # valid for Serve
    assert build_app(app["args"]) is not None


def test_rayservice_serves_the_graph_of_serve_yaml():
    """The KubeRay manifest repeats serve.yaml's application; they must not drift."""
    serve = yaml.safe_load((ROOT / "configs/serve.yaml").read_text())["applications"][0]
    manifest = yaml.safe_load((ROOT / "configs/rayservice.yaml").read_text())
    kube = yaml.safe_load(manifest["spec"]["serveConfigV2"])["applications"][0]
    assert kube["import_path"] == serve["import_path"]
    assert kube["args"]["default_variant"] == serve["args"]["default_variant"]
    by_name = {v["name"]: v for v in serve["args"]["variants"]}
    for variant in kube["args"]["variants"]:
        assert variant == by_name[variant["name"]], variant["name"]


def test_gpu_config_without_gpus_runs_on_cpu_sized_to_fit_and_says_so(caplog):
    config = VariantConfig(name="tiny", num_gpus=1, num_cpus=4)
    with caplog.at_level("WARNING", logger="mrt_serve.app"):
        cpu = generator_options(config, {"CPU": 2.0}, n_generators=2)["ray_actor_options"]
    assert "has no GPU: running it on CPU with 0.5 CPU(s)" in caplog.text
    assert cpu["num_gpus"] == 0 and cpu["num_cpus"] == 0.5
    assert cpu["runtime_env"]["env_vars"]["JAX_PLATFORMS"] == "cpu"
    gpu = generator_options(config, {"CPU": 16.0, "GPU": 1.0}, 1)["ray_actor_options"]
    assert gpu["num_gpus"] == 1 and gpu["num_cpus"] == 4
    assert gpu["runtime_env"]["env_vars"]["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert gpu["runtime_env"]["env_vars"]["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] == "0"


def replica_actor_options() -> dict[str, dict]:
    """The Ray actor options of every kind of replica the builder makes (the Ingress reads
    Serve's private `_bound_deployment`: Serve has no public accessor for them)."""
    ingress = build_app({"variants": [{"name": "tiny"}]})._bound_deployment
    generators, styles = ingress.init_args[:2]
    gpu = generator_options(VariantConfig(name="base", variant="mrt2_base", num_gpus=1),
                            {"CPU": 8.0, "GPU": 1.0}, 1)
    return {
        "ingress": ingress.ray_actor_options,
        "cpu generator": generators["tiny"]._bound_deployment.ray_actor_options,
        "gpu generator": gpu["ray_actor_options"],
        "style embedder": styles._bound_deployment.ray_actor_options,
    }


def test_the_chunk_path_returns_the_largest_chunk_inline():
    """Above Ray's inline limit a reply goes through the object store (measured: 384 KB
    2 s chunks, 8 sessions, generator -> client overhead p50 about 1.8x): the Generator
    (chunk replies) and the Ingress (WebSocket messages to the proxy) raise the limit
    past the largest message a client can ask for: 10 s chunks sent as base64 JSON."""
    longest = WsParams.model_fields["chunk_seconds"].metadata
    seconds = next(m.le for m in longest if hasattr(m, "le"))
    pcm = np.zeros((round(seconds * SAMPLE_RATE), CHANNELS), np.int16)
    largest = len(base64.b64encode(to_wav_bytes(pcm, SAMPLE_RATE))) + 4096  # + metadata
    replicas = replica_actor_options()
    for name in ("ingress", "cpu generator", "gpu generator"):
        env = replicas[name]["runtime_env"]["env_vars"]
        limit = int(env["RAY_max_direct_call_object_size"])
        assert limit >= largest, (name, limit, largest)


def test_every_launcher_starts_nodes_with_the_node_env():
    """Ray reads these in processes it starts itself (each node's proxy), which no
    deployment's runtime_env reaches, so every way we start nodes sets them."""
    serve_script = (ROOT / "scripts/serve").read_text()
    cluster = yaml.safe_load((ROOT / "configs/rayservice.yaml").read_text())["spec"]
    groups = [cluster["rayClusterConfig"]["headGroupSpec"],
              *cluster["rayClusterConfig"]["workerGroupSpecs"]]
    assert set(NODE_ENV) >= {*PROXY_CALLBACK_ENV, *GRPC_ENV}
    for name, value in NODE_ENV.items():
        assert f'{name}="${{{name}:-{value}}}"' in serve_script  # a user's own value wins
        for group in groups:
            for container in group["template"]["spec"]["containers"]:
                assert {"name": name, "value": value} in container["env"], container["name"]


def test_every_replica_uses_the_grpc_data_plane():
    """The ingress's calls go over gRPC whatever the cluster's own environment, and every
    replica it calls (CPU or GPU generator, style embedder) takes messages as large as the
    API allows."""
    replicas = replica_actor_options()
    assert len(replicas) == 4
    for name, options in replicas.items():
        assert GRPC_ENV.items() <= options["runtime_env"]["env_vars"].items(), name


def test_the_proxy_hook_turns_deflate_off_unless_a_config_asks_for_it():
    import uvicorn

    original = uvicorn.Config.__init__
    try:
        assert without_ws_compression() == [] and without_ws_compression() == []
        assert uvicorn.Config.__init__.__wrapped__ is original  # wrapped once, not twice
        assert uvicorn.Config(app=None).ws_per_message_deflate is False
        assert uvicorn.Config(app=None, ws_per_message_deflate=True).ws_per_message_deflate
    finally:
        uvicorn.Config.__init__ = original


def test_bad_configs_name_the_problem():
    with pytest.raises(ValueError, match="variants: list at least one"):
        build_app({"variants": []})
    with pytest.raises(ValueError, match=r"variants\.0\.variant[\s\S]*unknown model size 'mrt3'"):
        build_app({"variants": [{"name": "x", "variant": "mrt3"}]})
    with pytest.raises(ValueError, match=r"variants\[x\]\.variant: unknown model variant 'x'"):
        build_app({"variants": [{"name": "x"}]})  # a name without `variant` must be a model
    with pytest.raises(ValueError, match="default_variant: 'b' is not among"):
        build_app({"variants": [{"name": "tiny"}], "default_variant": "b"})
    with pytest.raises(ValueError, match="ab_split: 'b' is not a served variant"):
        build_app({"variants": [{"name": "tiny"}], "ab_split": {"tiny": 1, "b": 1}})
    with pytest.raises(ValueError, match="letters, digits"):
        build_app({"variants": [{"name": "a.b"}]})
    with pytest.raises(ValueError, match=r"variants\.0\.idle_session_seconds: Input should be "
                                         "greater than 0"):
        build_app({"variants": [{"name": "tiny", "idle_session_seconds": 0}]})
