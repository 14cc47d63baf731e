"""A config sized for GPU hosts on a one-GPU Ray cluster: every variant serves.

An application ("onegpu", under /onegpu) on the test session's Ray Serve instance, whose
one logical GPU makes it a one-GPU box: two tiny variants that each ask for a whole GPU,
as configs/serve.yaml's two variants do. Asked for as written, Ray would place one of
them and leave the other waiting for a GPU for good; fitted to the cluster
(deployments/placement.py), each replica holds half the GPU and both stream. One of them
is autoscaled, as serve.yaml's default variant is, and may not grow past the one replica
the GPU has room for.
"""

from __future__ import annotations

import httpx
import pytest

from .serve_fixtures import deploy, tiny_config

VARIANTS = ("tiny", "tiny_b")
AUTOSCALED = {"min_replicas": 1, "max_replicas": 4}
# A variant left waiting for a GPU keeps `serve.run` waiting for good: fail in minutes
# (the two tiny generators are ready in well under one here).
pytestmark = pytest.mark.timeout(300)


def one_gpu_config(tiny_repo) -> dict:
    """Two tiny variants that each ask for a whole GPU, the second one autoscaled."""
    config = tiny_config(tiny_repo, max_sessions=1, buckets=(1,))
    one = {**config["variants"][0], "num_gpus": 1, "num_cpus": 1}
    config["variants"] = [{**one, "name": "tiny"}, {**one, "name": "tiny_b", "variant": "tiny",
                                                     "autoscaling_config": AUTOSCALED}]
    return config


@pytest.fixture(scope="module")
def http(serve_root, tiny_repo):
    from ray import serve

    base = deploy(serve_root, one_gpu_config(tiny_repo), name="onegpu", route_prefix="/onegpu")
    with httpx.Client(base_url=base, timeout=60) as client:
        yield client
    serve.delete("onegpu")  # frees the GPU and CPUs for the modules after this one


def test_both_variants_share_the_gpu_and_stream(http):
    import ray

    health = http.get("/health").json()
    assert {name: v["state"] for name, v in health["variants"].items()} == {
        "tiny": "ready", "tiny_b": "ready"}
    # Both replicas hold half of the one GPU (nothing else here asks for one): none was
    # moved to CPU and none waits. /health says so.
    assert ray.cluster_resources()["GPU"] == 1 and ray.available_resources().get("GPU", 0) == 0
    for name in VARIANTS:
        replicas = health["variants"][name]["replicas"]
        assert [r["ray_resources"] for r in replicas] == [{"CPU": 1.0, "GPU": 0.5}], name
        # Ray's GPU here is logical: JAX finds no CUDA and computes on CPU.
        assert replicas[0]["device"].startswith("cpu:"), replicas[0]["device"]
    for name in VARIANTS:
        r = http.post("/jam/start", data={"styles": "ambient", "chunk_seconds": 0.2,
                                          "variant": name})
        assert r.status_code == 200, r.text
        sid = r.json()["session_id"]
        try:
            chunk = http.get("/jam/next", params={"session_id": sid})
            assert chunk.status_code == 200, chunk.text
            assert chunk.json()["chunk"]["index"] == 0
        finally:
            http.post("/jam/stop", json={"session_id": sid})


def test_the_autoscaled_variant_may_not_grow_past_the_gpu_it_shares(serve_root, tiny_repo):
    """What the builder hands Serve on this cluster (read through Serve's private
    `_bound_deployment`: Serve has no public accessor for a bound deployment's config)."""
    from deployments.app import build_app

    generators = build_app(one_gpu_config(tiny_repo))._bound_deployment.init_args[0]
    scaling = generators["tiny_b"]._bound_deployment._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas) == (1, 1)
