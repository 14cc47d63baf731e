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
from deployments.placement import Placement, as_configured, fit_to_cluster
from deployments.proxy import PROXY_CALLBACK_ENV, WS_MAX_MESSAGE_BYTES, without_ws_compression
from deployments.transport import GRPC_ENV, NODE_ENV
from serve_app.api.settings import ApiSettings
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


def serve_yaml(**changes) -> AppConfig:
    app = yaml.safe_load((ROOT / "configs/serve.yaml").read_text())["applications"][0]
    return AppConfig(**{**app["args"], **changes})


def placed(config: AppConfig, *nodes: dict) -> dict[str, tuple[float, float]]:
    """(GPUs, CPUs) per variant on a cluster of `nodes` (one: a single box)."""
    return {name: (p.num_gpus, p.num_cpus)
            for name, p in fit_to_cluster(config, list(nodes)).items()}


def test_serve_yaml_fits_one_gpu_box_both_variants_sharing_the_gpu(caplog):
    """serve.yaml asks for a GPU per variant; on a one-GPU box Ray would leave one variant
    (maybe the default) waiting for a GPU for good."""
    with caplog.at_level("WARNING", logger="mrt_serve.app"):
        assert placed(serve_yaml(), {"CPU": 16.0, "GPU": 1.0}) == {
            "mrt2_base": (0.5, 4.0), "mrt2_small": (0.5, 4.0)}
    assert ("asks for 2 GPU(s) for its generators' minimum replicas but this Ray cluster has 1: "
            "up to 2 replicas share each GPU (Generator_mrt2_base 0.5 GPU, Generator_mrt2_small "
            "0.5 GPU)") in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="mrt_serve.app"):  # enough: as configured
        assert placed(serve_yaml(), {"CPU": 16.0, "GPU": 2.0}) == {
            "mrt2_base": (1.0, 4.0), "mrt2_small": (1.0, 4.0)}
    assert "GPU(s)" not in caplog.text and "CPU(s)" not in caplog.text
    # 8 CPUs, less the ingress's 2 replicas and the style embedder (1.5): 3.25 each
    assert placed(serve_yaml(), {"CPU": 8.0, "GPU": 2.0}) == {
        "mrt2_base": (1.0, 3.25), "mrt2_small": (1.0, 3.25)}


def test_serve_yaml_without_gpus_runs_on_cpu_sized_to_fit_and_says_so(caplog):
    with caplog.at_level("WARNING", logger="mrt_serve.app"):
        placements = fit_to_cluster(serve_yaml(), [{"CPU": 2.0}])
    assert {name: (p.num_gpus, p.num_cpus) for name, p in placements.items()} == {
        "mrt2_base": (0.0, 0.25), "mrt2_small": (0.0, 0.25)}
    assert "this Ray cluster has no GPU: running them on CPU" in caplog.text
    assert ("asks for 8 CPU(s) for its generators' minimum replicas and this Ray cluster has "
            "0.5 beside the ingress and style embedder") in caplog.text
    cpu = generator_options(VariantConfig(name="mrt2_base", num_gpus=1), placements["mrt2_base"])
    env = cpu["ray_actor_options"]["runtime_env"]["env_vars"]
    assert env["JAX_PLATFORMS"] == "cpu" and "XLA_PYTHON_CLIENT_PREALLOCATE" not in env
    gpu = generator_options(VariantConfig(name="mrt2_base", num_gpus=1), Placement(0.5, 4.0))
    assert gpu["ray_actor_options"]["num_gpus"] == 0.5
    assert gpu["ray_actor_options"]["runtime_env"]["env_vars"]["JAX_PLATFORMS"] == "cuda,cpu"


def test_shared_gpus_hold_whole_shares_of_every_minimum_replica():
    def variants(*mins: int) -> AppConfig:
        return AppConfig(variants=[
            {"name": f"v{i}", "variant": "tiny", "num_gpus": 1,
             "autoscaling_config": {"min_replicas": m, "max_replicas": 4}}
            for i, m in enumerate(mins)])

    # 3 replicas on 2 GPUs: 2 per GPU, so that no GPU is asked for a share and a half
    assert {g for g, _ in placed(variants(1, 1, 1), {"GPU": 2.0}).values()} == {0.5}
    # a variant at 2 replicas counts twice; one that may scale to zero needs room for one
    assert {g for g, _ in placed(variants(2, 0), {"GPU": 1.0}).values()} == {0.3333}
    six = placed(variants(*[1] * 6), {"GPU": 1.0})
    assert sum(g for g, _ in six.values()) <= 1.0  # Ray counts 1e-4 of a GPU
    assert placed(variants(1), {"GPU": 1.0}) == {"v0": (1.0, 1.0)}


def test_each_replica_fits_on_one_node(caplog):
    """Totals are not enough: a replica runs on one node. A GPU replica asks for no more
    than its share of its GPU node's CPUs (4 CPUs per GPU is a common cloud shape), a CPU
    one for no more than the largest node has; the ingress and style embedder (1.5 CPUs
    here) may land on any node."""
    def nodes(*shapes: tuple[float, float]) -> dict[str, tuple[float, float]]:
        return placed(serve_yaml(), *({"CPU": c, "GPU": g} if g else {"CPU": c}
                                      for c, g in shapes))

    with caplog.at_level("WARNING", logger="mrt_serve.app"):
        # a CPU head and one 4-CPU GPU worker: 12 CPUs in all, but both generators share
        # the worker's 4 - 1.5
        assert nodes((8, 0), (4, 1)) == {"mrt2_base": (0.5, 1.25), "mrt2_small": (0.5, 1.25)}
    assert ("more CPUs per generator replica than a node of this Ray cluster holds for it "
            "(on a GPU, its share of the CPUs of the GPU node with the fewest per GPU"
            ) in caplog.text
    # three 2-CPU nodes, no GPU: 4.5 CPUs in all beside the ingress and style embedder, but
    # no node has more than 2 - 1.5
    assert nodes((2, 0), (2, 0), (2, 0)) == {"mrt2_base": (0.0, 0.5), "mrt2_small": (0.0, 0.5)}
    # a GPU node of 8 CPUs per generator: as configured
    assert nodes((8, 0), (8, 1), (8, 1)) == {"mrt2_base": (1.0, 4.0), "mrt2_small": (1.0, 4.0)}


def test_autoscaling_grows_only_into_the_room_the_cluster_has(caplog):
    """A replica Ray cannot place waits for good while the autoscaler counts it as
    started: max_replicas comes down to what the room beside the minimum replicas holds."""
    def max_replicas(resources: dict) -> dict[str, int | None]:
        return {name: p.max_replicas
                for name, p in fit_to_cluster(serve_yaml(), [resources]).items()}

    with caplog.at_level("WARNING", logger="mrt_serve.app"):
        # one GPU, both variants on half of it: no room for a second mrt2_base
        assert max_replicas({"CPU": 16.0, "GPU": 1.0}) == {"mrt2_base": 1, "mrt2_small": None}
    assert ("Generator_mrt2_base may scale to 8 replicas but this Ray cluster has room for 1 "
            "beside the other variants' minimum replicas: max_replicas 1") in caplog.text
    # 4 GPUs hold 2 more mrt2_base replicas beside the minimum 2
    assert max_replicas({"CPU": 64.0, "GPU": 4.0})["mrt2_base"] == 3
    # on CPU only (this dev box): no room beyond the minimum either
    assert max_replicas({"CPU": 2.0})["mrt2_base"] == 1
    caplog.clear()
    with caplog.at_level("WARNING", logger="mrt_serve.app"):  # room for all 8: as configured
        assert max_replicas({"CPU": 128.0, "GPU": 16.0})["mrt2_base"] is None
    assert caplog.text == ""
    options = generator_options(serve_yaml().variants[0], Placement(0.5, 4.0, max_replicas=1))
    assert options["autoscaling_config"]["max_replicas"] == 1
    assert options["autoscaling_config"]["policy"]["policy_kwargs"] == {
        "target_sessions_per_replica": 24}
    assert serve_yaml().variants[0].autoscaling_config["max_replicas"] == 8  # not changed


def test_fit_to_cluster_false_asks_for_the_config_as_written():
    """For a cluster that adds GPU nodes on demand: a fit made before they join would run
    the generators on CPU for good (configs/rayservice.yaml sets it)."""
    config = serve_yaml(fit_to_cluster=False)
    assert {name: (p.num_gpus, p.num_cpus) for name, p in as_configured(config).items()} == {
        "mrt2_base": (1.0, 4.0), "mrt2_small": (1.0, 4.0)}
    manifest = yaml.safe_load((ROOT / "configs/rayservice.yaml").read_text())
    kube = yaml.safe_load(manifest["spec"]["serveConfigV2"])["applications"][0]
    assert kube["args"]["fit_to_cluster"] is False


def replica_actor_options() -> dict[str, dict]:
    """The Ray actor options of every kind of replica the builder makes (the Ingress reads
    Serve's private `_bound_deployment`: Serve has no public accessor for them)."""
    ingress = build_app({"variants": [{"name": "tiny"}]})._bound_deployment
    generators, styles = ingress.init_args[:2]
    gpu = generator_options(VariantConfig(name="base", variant="mrt2_base", num_gpus=1),
                            Placement(1.0, 4.0))
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
        # a loop as large as an upload may be fits in one message, as base64
        assert uvicorn.Config(app=None).ws_max_size == WS_MAX_MESSAGE_BYTES
        assert 4 * ApiSettings().max_upload_bytes / 3 < WS_MAX_MESSAGE_BYTES
        assert uvicorn.Config(app=None, ws_max_size=5).ws_max_size == 5
    finally:
        uvicorn.Config.__init__ = original


def test_a_bad_compile_cache_limit_is_refused_with_the_graph(monkeypatch):
    """Read by every replica as it starts, where each would fail alone; refused first by
    the app builder (`serve run`, `mrt-serve local`, bench_local) naming the variable."""
    for bad in ("nan", "0", "-1", "lots"):
        monkeypatch.setenv("MRT_COMPILE_CACHE_MAX_GB", bad)
        with pytest.raises(ValueError, match=f"MRT_COMPILE_CACHE_MAX_GB: a size in GB above "
                                             f"0, got '{bad}'"):
            build_app({"variants": [{"name": "tiny"}]})


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
    # each session's chunk stream holds a request on its replica while it runs
    with pytest.raises(ValueError, match=r"variants\.0[\s\S]*max_ongoing_requests: must be at "
                                         r"least twice max_sessions \(64\), got 40"):
        build_app({"variants": [{"name": "tiny", "max_sessions": 32,
                                 "max_ongoing_requests": 40}]})
    # YAML's .nan and .inf are typos, never settings: a NaN A/B weight would send no
    # session anywhere
    with pytest.raises(ValueError, match=r"ab_split\.tiny: Input should be a finite number"):
        build_app({"variants": [{"name": "tiny"}], "ab_split": {"tiny": float("nan")}})
    with pytest.raises(ValueError, match=r"variants\.0\.num_gpus: Input should be a finite"):
        build_app({"variants": [{"name": "tiny", "num_gpus": float("inf")}]})
    # a misspelt setting was left at its default without a word (16 sessions, not 8)
    for args, where in [
        ({"variants": [{"name": "tiny", "max_sesions": 8}]}, r"variants\.0\.max_sesions"),
        ({"variants": [{"name": "tiny"}], "defualt_variant": "tiny"}, "defualt_variant"),
        ({"variants": [{"name": "tiny"}], "style_embedder": {"mok": True}},
         r"style_embedder\.mok"),
        ({"variants": [{"name": "tiny"}], "api": {"max_stylez": 3}}, r"api\.max_stylez"),
    ]:
        with pytest.raises(ValueError, match=where + ": Extra inputs are not permitted"):
            build_app(args)
    # the `api:` section is checked with the graph, not first when the ingress starts
    with pytest.raises(ValueError, match=r"api\.max_bars: Input should be greater than or "
                                         "equal to 1"):
        build_app({"variants": [{"name": "tiny"}], "api": {"max_bars": 0}})
