"""A config sized for GPU hosts on a one-GPU Ray cluster: every variant serves.

An application ("onegpu", under /onegpu) on the test session's Ray Serve instance, whose
one logical GPU makes it a one-GPU box: two tiny variants that each ask for a whole GPU,
as configs/serve.yaml's two variants do. Asked for as written, Ray would place one of
them and leave the other waiting for a GPU for good; fitted to the cluster
(deployments/placement.py), each replica holds half the GPU and both stream.
"""

from __future__ import annotations

import httpx
import pytest

from .serve_fixtures import deploy, tiny_config

VARIANTS = ("tiny", "tiny_b")
# A variant left waiting for a GPU keeps `serve.run` waiting for good: fail in minutes
# (the two tiny generators are ready in well under one here).
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def http(serve_root, tiny_repo):
    from ray import serve

    config = tiny_config(tiny_repo, max_sessions=1, buckets=(1,))
    one = {**config["variants"][0], "num_gpus": 1, "num_cpus": 1}
    config["variants"] = [{**one, "name": "tiny"}, {**one, "name": "tiny_b", "variant": "tiny"}]
    base = deploy(serve_root, config, name="onegpu", route_prefix="/onegpu")
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
