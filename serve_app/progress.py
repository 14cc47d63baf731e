"""How far a render (`/generate`, `/generate_style`) has got, by its `request_id`.

A client polls `GET /progress` while its render request is still open. In a Ray
cluster the proxy sends that poll to any ingress replica, and it prefers the ones
with fewer requests in flight, which the replica holding the render is not:
with two ingress replicas, 49 of 49 polls during a 16-bar render reached the
other one. So the ingress writes each render's stage to a store that all its
replicas share (Ray's key-value store there, `deployments/kv.py`; a bounded
dict in one process), and any replica answers from it, asking the session's
generator for the live frame count while it generates.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Protocol

from .errors import ApiError, UnknownSession, shown

log = logging.getLogger(__name__)

FINISHED = ("done", "error")
# A render still going is rewritten as it moves on; one whose record has not moved for
# this long past the retention period lost its ingress (no render takes an hour).
ORPHAN_SECONDS = 3600.0
SetStage = Callable[..., Awaitable[None]]  # set_stage(stage, **RenderProgress fields)


class ProgressStore(Protocol):
    """Text values by key; every call may block (a network round trip)."""

    def get(self, key: str) -> str | None: ...
    def put(self, key: str, value: str) -> None: ...
    def delete(self, key: str) -> None: ...
    def keys(self) -> list[str]: ...


class MemoryProgressStore:
    """One process's store, holding at most `max_entries` (the oldest written go first)."""

    def __init__(self, max_entries: int = 4096) -> None:
        self.max_entries = max_entries
        self._values: collections.OrderedDict[str, str] = collections.OrderedDict()

    def get(self, key: str) -> str | None:
        return self._values.get(key)

    def put(self, key: str, value: str) -> None:
        self._values[key] = value
        self._values.move_to_end(key)
        while len(self._values) > self.max_entries:
            self._values.popitem(last=False)

    def delete(self, key: str) -> None:
        self._values.pop(key, None)

    def keys(self) -> list[str]:
        return list(self._values)

    def __len__(self) -> int:
        return len(self._values)


@dataclasses.dataclass
class RenderProgress:
    """A render's record. `stage`: decoding (the upload), generating (frames; `prefill`
    while a loop is forced in, reported from the generator), finishing (cutting,
    resampling, loudness), done, or error (with `error`, what the client was told)."""

    stage: str
    total: int = 0
    n: int = 0
    variant: str | None = None
    session_id: str | None = None
    error: str | None = None
    expires_at: float | None = None  # unix seconds; None: written by an older version

    def expired(self, now: float) -> bool:
        return self.expires_at is None or now >= self.expires_at

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> RenderProgress:
        return cls(**json.loads(text))


class ProgressBoard:
    """Writes a render's stages under its request id and answers `/progress` from them.

    A finished record stays readable for `retention_seconds`, then this process
    deletes it, so the store does not grow with every render ever made. Each record
    also says when it expires, so that those an ingress that died can no longer
    delete (Ray's store outlives replicas) are swept by any other: each board looks
    for them once per retention period, when it writes. A store that fails is logged
    and never fails the render itself.
    """

    def __init__(self, store: ProgressStore, retention_seconds: float = 600.0) -> None:
        self.store = store
        self.retention_seconds = retention_seconds
        self._tasks: set[asyncio.Task] = set()  # forgetting and sweeping, in the background
        self._next_sweep = 0.0  # monotonic

    @contextlib.asynccontextmanager
    async def tracking(self, request_id: str | None) -> AsyncIterator[SetStage]:
        """Yields `set(stage, **fields)` for one render; a render that raises is
        recorded as `error` with its message. Without a request id nothing is stored."""
        record = RenderProgress(stage="starting")

        async def set_stage(stage: str, **fields) -> None:
            nonlocal record
            record = dataclasses.replace(record, stage=stage, **fields)
            if request_id:
                await self._write(request_id, record)

        try:
            # at once: a client polling as soon as it has sent the render learns it has
            # begun (decoding its loop can take seconds) instead of an unknown request id
            await set_stage("starting")
            yield set_stage
        except BaseException as e:
            await asyncio.shield(set_stage("error", error=_told(e)))
            raise

    async def _write(self, request_id: str, record: RenderProgress) -> None:
        finished = record.stage in FINISHED
        lifetime = self.retention_seconds + (0.0 if finished else ORPHAN_SECONDS)
        value = dataclasses.replace(record, expires_at=time.time() + lifetime).to_json()
        try:
            await asyncio.to_thread(self.store.put, request_id, value)
        except Exception as e:
            log.warning("progress of %r not recorded (%s)", request_id, e)
            return
        if finished:
            self._background(self._forget(request_id, value))
        if time.monotonic() >= self._next_sweep:
            self._next_sweep = time.monotonic() + self.retention_seconds
            self._background(self.sweep())

    def _background(self, work) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)  # the loop holds tasks weakly
        task.add_done_callback(self._tasks.discard)

    async def sweep(self) -> int:
        """Deletes the expired records in the store, whoever wrote them; returns how many.
        One round trip per record: it runs in the background, once per retention period."""
        deleted = 0
        try:
            keys = await asyncio.to_thread(self.store.keys)
            for key in keys:
                value = await asyncio.to_thread(self.store.get, key)
                if value is not None and _parsed(value).expired(time.time()):
                    await asyncio.to_thread(self.store.delete, key)
                    deleted += 1
        except Exception as e:
            log.warning("expired progress records not swept (%s)", e)
        if deleted:
            log.info("swept %d expired progress records", deleted)
        return deleted

    async def _forget(self, request_id: str, value: str) -> None:
        await asyncio.sleep(self.retention_seconds)
        try:
            # a later render may have reused the id: delete only what this one wrote
            if await asyncio.to_thread(self.store.get, request_id) == value:
                await asyncio.to_thread(self.store.delete, request_id)
        except Exception as e:
            log.warning("progress of %r not deleted (%s)", request_id, e)

    async def _record(self, request_id: str) -> RenderProgress:
        value = await asyncio.to_thread(self.store.get, request_id)
        record = None if value is None else _parsed(value)
        if record is None or record.expired(time.time()):
            raise UnknownSession(f"request_id: no generation known as {shown(request_id)}")
        return record

    async def read(self, request_id: str, generators: Mapping) -> dict:
        """`{n, total, percent, stage}` (and `error` for a failed render)."""
        record = await self._record(request_id)
        stage, n, total = record.stage, record.n, record.total
        if stage == "generating" and record.variant in generators:
            try:
                live = await generators[record.variant].progress(record.session_id)
            except ApiError:
                live = {}
            if not live:  # the session has ended since: its render has moved on
                record = await self._record(request_id)
                stage, n, total = record.stage, record.n, record.total
            elif live.get("prefill_pending"):
                stage, n = "prefill", live["prefill_done"]
                total = live["prefill_done"] + live["prefill_pending"]
            else:
                n = live.get("n", n)
        answer = {"n": n, "total": total, "percent": round(100 * n / total, 1) if total else 0.0,
                  "stage": stage}
        if record.error is not None:
            answer["error"] = record.error
        return answer


def _parsed(value: str) -> RenderProgress:
    """A stored record; one this version cannot read counts as expired."""
    try:
        return RenderProgress.from_json(value)
    except (TypeError, ValueError):
        return RenderProgress(stage="unreadable")


def _told(error: BaseException) -> str:
    """What a failed render's record says: the message its client got, if it got one."""
    if isinstance(error, ApiError):
        return error.message
    if isinstance(error, asyncio.CancelledError):
        return "cancelled: the render's request ended before it did"
    return "internal error (the server log has it)"
