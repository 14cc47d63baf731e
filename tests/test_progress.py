"""Renders' progress records (serve_app/progress.py) in one process: what each stage
writes, what a failed render leaves, and that records do not pile up.

tests/test_serve_http.py reads them through Ray's shared store from either ingress replica.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from serve_app.errors import BadRequest, UnknownSession
from serve_app.progress import MemoryProgressStore, ProgressBoard, RenderProgress


def test_the_memory_store_keeps_the_newest_records_only():
    store = MemoryProgressStore(max_entries=3)
    for i in range(5):
        store.put(f"r{i}", str(i))
    store.put("r2", "again")  # rewritten: now the newest
    store.put("r5", "5")
    assert len(store) == 3 and [store.get(k) for k in ("r2", "r4", "r5")] == ["again", "4", "5"]
    assert store.get("r3") is None


def test_a_finished_render_is_readable_until_its_retention_ends():
    async def scenario():
        board = ProgressBoard(MemoryProgressStore(), retention_seconds=0.2)
        async with board.tracking("r1") as set_stage:
            await set_stage("generating", total=50)
            assert (await board.read("r1", {}))["stage"] == "generating"
            await set_stage("finishing", n=50)
            await set_stage("done")
        assert await board.read("r1", {}) == {"n": 50, "total": 50, "percent": 100.0,
                                              "stage": "done"}
        await asyncio.sleep(0.4)
        with pytest.raises(UnknownSession, match="request_id: no generation known as 'r1'"):
            await board.read("r1", {})

    asyncio.run(scenario())


def test_a_render_is_known_from_the_moment_it_begins():
    async def scenario():
        board = ProgressBoard(MemoryProgressStore())
        async with board.tracking("r1") as set_stage:
            assert await board.read("r1", {}) == {"n": 0, "total": 0, "percent": 0.0,
                                                  "stage": "starting"}
            await set_stage("generating", total=50)
            assert (await board.read("r1", {}))["stage"] == "generating"

    asyncio.run(scenario())


def test_a_failed_render_records_what_the_client_was_told_and_is_forgotten_too():
    async def scenario():
        store = MemoryProgressStore()
        board = ProgressBoard(store, retention_seconds=0.2)
        with pytest.raises(BadRequest):
            async with board.tracking("bad") as set_stage:
                await set_stage("decoding")
                raise BadRequest("loop_audio: the upload is empty")
        assert await board.read("bad", {}) == {
            "n": 0, "total": 0, "percent": 0.0, "stage": "error",
            "error": "loop_audio: the upload is empty"}
        with pytest.raises(RuntimeError):
            async with board.tracking("crash"):
                raise RuntimeError("secret path /srv/x")
        assert (await board.read("crash", {}))["error"] == "internal error (the server log has it)"
        await asyncio.sleep(0.4)
        assert len(store) == 0

    asyncio.run(scenario())


def test_a_render_without_a_request_id_stores_nothing():
    async def scenario():
        store = MemoryProgressStore()
        async with ProgressBoard(store).tracking(None) as set_stage:
            await set_stage("generating", total=10)
            await set_stage("done")
        assert len(store) == 0

    asyncio.run(scenario())


def test_a_record_rewritten_by_a_newer_render_outlives_the_older_ones_retention():
    async def scenario():
        store = MemoryProgressStore()
        board = ProgressBoard(store, retention_seconds=0.2)
        async with board.tracking("same") as set_stage:
            await set_stage("done")
        async with board.tracking("same") as set_stage:
            await set_stage("generating", total=10)
            await asyncio.sleep(0.4)  # the first render's retention ends meanwhile
            assert (await board.read("same", {}))["stage"] == "generating"

    asyncio.run(scenario())


def test_a_render_reusing_a_finished_ones_id_keeps_its_own_retention():
    async def scenario():
        board = ProgressBoard(MemoryProgressStore(), retention_seconds=0.3)
        async with board.tracking("same") as set_stage:
            await set_stage("done", n=1)
        await asyncio.sleep(0.2)
        async with board.tracking("same") as set_stage:
            await set_stage("done", n=2)
        await asyncio.sleep(0.2)  # the first render's retention has ended, not the second's
        assert (await board.read("same", {}))["n"] == 2

    asyncio.run(scenario())


def test_records_an_ingress_that_died_left_behind_are_swept_by_another():
    """Ray's store outlives the ingress that wrote a record, and so its deletion: each
    record says when it expires, and a board's first write sweeps what has."""
    async def scenario():
        store = MemoryProgressStore()
        now = time.time()
        store.put("orphan", RenderProgress("generating", total=9, expires_at=now - 1).to_json())
        store.put("from-an-older-version", json.dumps({"stage": "done", "total": 8, "n": 8}))
        store.put("unreadable", "{not json")
        store.put("live", RenderProgress("generating", total=9, expires_at=now + 60).to_json())
        board = ProgressBoard(store, retention_seconds=60)
        with pytest.raises(UnknownSession, match="no generation known as 'orphan'"):
            await board.read("orphan", {})  # expired: gone for readers at once
        assert (await board.read("live", {}))["stage"] == "generating"
        async with board.tracking("new") as set_stage:
            await set_stage("decoding")
        for _ in range(250):  # the sweep runs in the background
            if sorted(store.keys()) == ["live", "new"]:
                break
            await asyncio.sleep(0.02)
        assert sorted(store.keys()) == ["live", "new"]
        assert await board.sweep() == 0

    asyncio.run(scenario())
