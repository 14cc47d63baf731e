"""Generator deployment: one per configured variant; a thin shell over GeneratorCore."""

from __future__ import annotations

import ray
from ray import serve

from serve_app import logs
from serve_app.generator import GeneratorCore
from serve_app.jam_spec import JamSpec, JamUpdate
from serve_app.metrics import GeneratorMetrics
from serve_app.selection import ModelSelection

from .metrics import RayServeMetricsSink
from .selection_store import RayKVSelectionStore


@serve.deployment
class Generator:
    def __init__(self, name: str, variant: str, options: dict) -> None:
        logs.configure()
        context = serve.get_replica_context()
        self.core = GeneratorCore(
            variant, name=name, replica_tag=context.replica_id.unique_id,
            store=RayKVSelectionStore(context.app_name),
            metrics=GeneratorMetrics(RayServeMetricsSink(name)), **options,
        )
        # What Ray placed this replica with: a replica sharing a GPU, or moved to CPU by
        # deployments/placement.py, shows it in /health, not only in a worker's log.
        self.ray_resources = ray.get_runtime_context().get_assigned_resources()

    async def health(self) -> dict:
        # This replica's; the ingress merges every replica's (serve_app/replicas.py), as
        # for model_status.
        return {**await self.core.replica_health(), "ray_resources": self.ray_resources}

    def check_health(self) -> None:
        # A model that failed to load is reported by /health (no crash loop);
        # a step loop that died after serving is a broken replica: restart it.
        if self.core.state == "error" and self.core.engine is not None:
            raise RuntimeError(self.core.error)

    def record_autoscaling_stats(self) -> dict[str, float]:
        return {"sessions": float(self.core.session_count)}

    async def start(self, spec: JamSpec, avoid: tuple[str, ...] = ()) -> dict:
        # `avoid`: replicas that refused this start, read by the router, not here.
        return await self.core.start(spec)

    async def next_chunk(self, *, session_id: str, timeout: float):
        return await self.core.next_chunk(session_id, timeout)

    async def chunks(self, *, session_id: str, credit: int):
        # Called with `stream=True`. Serve pulls this generator as the gRPC stream has
        # room only because user code runs on Serve's own loop (CHUNK_PATH_ENV in
        # deployments/app.py); in a thread of its own, Serve would drain it into a
        # queue without bound (the credit bounds what is taken from the backlog, not
        # what Serve would buffer).
        async for chunk in self.core.chunks(session_id, credit):
            yield chunk

    async def grant(self, *, session_id: str, chunks: int) -> dict:
        return await self.core.grant(session_id, chunks)

    async def consume(self, *, session_id: str, chunk_index: int) -> dict:
        return await self.core.consume(session_id, chunk_index)

    async def update(self, *, session_id: str, update: JamUpdate) -> dict:
        return await self.core.update(session_id, update)

    async def status(self, *, session_id: str) -> dict:
        return await self.core.status(session_id)

    async def stop(self, *, session_id: str) -> dict:
        return await self.core.stop(session_id)

    async def stop_all(self) -> dict:
        return await self.core.stop_all()

    async def progress(self, *, session_id: str) -> dict:
        return await self.core.progress(session_id)

    async def reseed(self, *, session_id: str, loop, anchor_bars: float | None = None) -> dict:
        return await self.core.reseed(session_id, loop, anchor_bars)

    async def recent_audio(self, *, session_id: str, seconds: float):
        return await self.core.recent_audio(session_id, seconds)

    async def select(self, selection: ModelSelection, **options) -> dict:
        return await self.core.select(selection, **options)

    async def load_assets(self, repo: str, revision: str | None = None) -> dict:
        return await self.core.load_assets(repo, revision)

    async def model_status(self) -> dict:
        return await self.core.replica_model_status()

    def __del__(self) -> None:
        core = getattr(self, "core", None)
        if core is not None:
            core.shutdown()
