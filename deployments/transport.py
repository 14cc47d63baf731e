"""How requests and audio travel between Serve's proxy and our replicas.

Serve's default data plane is Ray actor calls: a request to a replica is a streaming actor
task whose first item says whether the replica accepted it, and every reply is a Ray
object. Serve 2.60 can instead call replicas over its own gRPC channel (each replica runs
the server anyway). For our chunk path, then a long-poll per chunk from the ingress to
the generator (now one stream per session) and a few WebSocket messages per chunk from
the ingress to the proxy, that made the serving overhead 1.4-1.9x smaller:
scripts/bench_serve.py (tiny, 2-core box, overhead p50) at 0.5 s chunks 5.4 -> 3.3 ms
for 1 session and 11.3 -> 6.2 for 8, at 2 s chunks 6.7 -> 4.7 and 13.3 -> 9.6
(docs/performance.md has the runs).

Two settings, both read by Ray when a process starts:
- `RAY_SERVE_USE_GRPC_BY_DEFAULT`: handles made in the process call over gRPC, and a proxy
  started with it calls the ingress over gRPC.
- `RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH`: gRPC refuses messages over 4 MB by default,
  and ours are larger at the API's own limits (a 60 s loop is 23 MB as float32 on its way
  to the generator and the style embedder, a 120 s render 31 MB of base64 WAV). -1 lifts
  the cap, as Ray's actor calls never had one; the API's limits bound every message.

Every replica gets both through its runtime_env (`deployments/app.py`), so the calls the
ingress makes use gRPC on any cluster. The proxy is started by Ray, not by a deployment,
so the nodes themselves must start with NODE_ENV: scripts/serve, configs/rayservice.yaml
and the test suite's Ray do. Without it the proxy falls back to actor calls and works as
before, only slower.
"""

from __future__ import annotations

from .proxy import PROXY_CALLBACK_ENV

GRPC_ENV = {
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": "-1",
}
# What every Ray node of ours starts with: settings read in processes Ray starts itself
# (the proxy above all), which no deployment's runtime_env reaches.
NODE_ENV = {**PROXY_CALLBACK_ENV, **GRPC_ENV}
