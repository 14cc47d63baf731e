"""Ingress deployment: the FastAPI app from serve_app, talking to deployment handles."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterator

from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError
from ray.serve.exceptions import DeploymentUnavailableError

from serve_app import logs
from serve_app.api.app import create_app
from serve_app.api.settings import ApiSettings
from serve_app.errors import ApiError, OverCapacity, SessionLost, Unavailable
from serve_app.replicas import variant_health, variant_model_status

from .kv import RayKV

log = logging.getLogger("mrt_serve.ingress")

PROGRESS_NAMESPACE = "mrt_serve_render_progress"

NO_REPLICA = "no generator replica is running yet (`serve status` says why if this lasts)"


@contextlib.contextmanager
def _remote_errors(session_id: str | None = None) -> Iterator[None]:
    """Errors of a deployment call as the API knows them.

    Ray re-raises remote exceptions wrapped; the API maps only our own errors to
    responses, so those are unwrapped and anything else propagates unchanged. A
    session's call that finds its generator replica dead is a SessionLost: the
    stream moves (serve_app/api/ws.py)."""
    try:
        yield
    except ApiError:
        raise
    except (ActorDiedError, ActorUnavailableError) as e:
        if session_id:
            raise SessionLost(
                f"unknown session {session_id}: its generator replica died"
                f"{SessionLost.ADVICE}"
            ) from e
        raise
    except Exception as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, ApiError):
            raise cause from None
        raise


async def _remote(handle, method: str, **kwargs):
    """Calls a deployment method, its errors as the API knows them."""
    with _remote_errors(kwargs.get("session_id")):
        return await getattr(handle, method).remote(**kwargs)


def _every_refusal(refusals: list[ApiError]) -> ApiError:
    """One answer for a start that every replica refused: 429 when all were full (retry
    later), else 503 (some are still loading)."""
    if len(refusals) == 1:
        return refusals[0]
    kind = OverCapacity if all(isinstance(r, OverCapacity) for r in refusals) else Unavailable
    reasons = "; ".join(f"replica {r.replica}: {r.message}" for r in refusals)
    return kind(f"no generator replica can take a session now ({len(refusals)} tried: "
                f"{reasons})")


class HandleGenerator:
    """GeneratorClient over a Generator deployment handle (session calls are pinned)."""

    def __init__(self, handle) -> None:
        self.handle = handle

    async def _call(self, method: str, **kwargs):
        return await _remote(self.handle, method, **kwargs)

    async def _each_replica(self, method: str) -> list[dict]:
        """`method`'s answer from every running replica, called in parallel (Serve's
        broadcast); a replica that fails the call (dying meanwhile) is left out,
        unless every one does."""
        answers = await self.handle.broadcast(method).results_async(return_exceptions=True)
        good = [a for a in answers if not isinstance(a, BaseException)]
        if not good:
            raise answers[0]
        return good

    async def health(self):
        """The variant's health over all its replicas (serve_app/replicas.py)."""
        try:
            return variant_health(await self._each_replica("health"))
        except DeploymentUnavailableError:  # none running: starting, or failed to deploy
            return {"state": "initializing", "sessions": 0, "max_sessions": 0, "replicas": [],
                    "error": NO_REPLICA}

    async def model_status(self):
        try:
            return variant_model_status(await self._each_replica("model_status"))
        except DeploymentUnavailableError as e:
            raise Unavailable(NO_REPLICA) from e

    async def stop_all(self):
        try:
            answers = await self._each_replica("stop_all")
        except DeploymentUnavailableError:  # no replica, no session
            answers = []
        return {"stopped": sum(a["stopped"] for a in answers)}

    async def start(self, spec):
        """Starts a session on a replica that takes it: one that refuses because it is
        full or still loading its model (a replica added by autoscaling compiles for
        minutes) is left out of the next try, until every replica has said no. A
        replica found dead is dropped by Serve's router, so the start is tried once more."""
        refusals: dict[str, ApiError] = {}
        died = False
        while True:
            try:
                return await self._call("start", spec=spec, avoid=tuple(refusals))
            except (OverCapacity, Unavailable) as e:
                if e.replica is None:
                    raise
                if e.replica in refusals:  # the router had no other replica to offer
                    raise _every_refusal(list(refusals.values())) from None
                log.info("start refused by generator replica %s (%s); trying another",
                         e.replica, e.message)
                refusals[e.replica] = e
            except (ActorDiedError, ActorUnavailableError) as e:
                if died:
                    raise Unavailable("generator replicas are restarting; retry shortly") from e
                died = True

    async def next_chunk(self, session_id, timeout):
        return await self._call("next_chunk", session_id=session_id, timeout=timeout)

    async def chunks(self, session_id, credit) -> AsyncIterator:
        """The session's chunks over one streaming call to its replica, instead of a
        call per chunk (Serve's routing, request and reply per call): through Serve
        the costliest part of a chunk's way (docs/performance.md)."""
        response = self.handle.options(stream=True).chunks.remote(session_id=session_id,
                                                                  credit=credit)
        try:
            with _remote_errors(session_id):
                async for chunk in response:
                    yield chunk
        finally:
            response.cancel()  # a stream left early (stop, move, disconnect) ends there too

    async def grant(self, session_id, chunks):
        return await self._call("grant", session_id=session_id, chunks=chunks)

    async def consume(self, session_id, chunk_index):
        return await self._call("consume", session_id=session_id, chunk_index=chunk_index)

    async def update(self, session_id, update):
        return await self._call("update", session_id=session_id, update=update)

    async def status(self, session_id):
        return await self._call("status", session_id=session_id)

    async def stop(self, session_id):
        return await self._call("stop", session_id=session_id)

    async def progress(self, session_id):
        return await self._call("progress", session_id=session_id)

    async def reseed(self, session_id, loop, anchor_bars=None):
        return await self._call("reseed", session_id=session_id, loop=loop,
                                anchor_bars=anchor_bars)

    async def recent_audio(self, session_id, seconds):
        return await self._call("recent_audio", session_id=session_id, seconds=seconds)

    async def select(self, selection, **options):
        return await self._call("select", selection=selection, **options)

    async def load_assets(self, repo, revision=None):
        return await self._call("load_assets", repo=repo, revision=revision)


class HandleStyles:
    def __init__(self, handle) -> None:
        self.handle = handle

    async def health(self):
        return await _remote(self.handle, "health")

    async def embed_texts(self, texts):
        return await _remote(self.handle, "embed_texts", texts=texts)

    async def embed_audio(self, samples, sample_rate):
        return await _remote(self.handle, "embed_audio", samples=samples,
                             sample_rate=sample_rate)


@serve.deployment
@serve.ingress()
class Ingress:
    def __init__(self, generators: dict, style_embedder, api: dict) -> None:
        logs.configure()
        self.generators = {name: HandleGenerator(h) for name, h in generators.items()}
        self.styles = HandleStyles(style_embedder)
        self.settings = ApiSettings.from_config(api)

    def __serve_build_asgi_app__(self):
        # renders' progress in the cluster's store: a /progress poll reaches any replica
        progress = RayKV(PROGRESS_NAMESPACE, serve.get_replica_context().app_name)
        return create_app(self.generators, self.styles, self.settings, progress)
