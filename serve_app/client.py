"""A Python client for `/ws/jam`: record a jam to a WAV, with a scripted update.

    mrt-serve jam --url ws://host:8000 --styles "ambient, techno" --seconds 20 \\
        --out jam.wav --update-at 10 --update-styles "jazz"

It asks for raw pcm16 binary frames (no base64, no WAV headers) and measures what a
musician feels: time to first audio and how long an update takes to be heard.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import Callable

import numpy as np
import websockets

from .frames import CHANNELS, SAMPLE_RATE


class JamError(RuntimeError):
    """The server answered with an `error` message."""


@dataclasses.dataclass
class JamRecording:
    started: dict
    audio: np.ndarray  # int16 [n, 2]
    chunks: list[dict]
    first_chunk_seconds: float
    update_sent_at: float | None = None
    update_applies_from_chunk: int | None = None
    update_heard_seconds: float | None = None  # update sent -> first chunk reflecting it
    stopped: dict | None = None  # the server's answer to `stop` (stop_and_wait)

    def summary(self) -> dict:
        return {
            "session_id": self.started.get("session_id"),
            "seconds": self.audio.shape[0] / SAMPLE_RATE,
            "chunks": len(self.chunks),
            "time_to_first_chunk_ms": round(self.first_chunk_seconds * 1000, 1),
            "update_applies_from_chunk": self.update_applies_from_chunk,
            "update_to_effect_ms": None if self.update_heard_seconds is None
            else round(self.update_heard_seconds * 1000, 1),
        }


def api_key_headers(api_key: str | None) -> dict:
    """What a server with API keys reads the key from (the WebSocket and every route)."""
    return {"X-API-Key": api_key} if api_key else {}


def ws_url(url: str) -> str:
    url = url.rstrip("/")
    if url.startswith("http"):
        url = "ws" + url[4:]
    return url if url.endswith("/ws/jam") else url + "/ws/jam"


async def stop_and_wait(ws, timeout: float = 10.0) -> dict | None:
    """Stops the socket's session and reads on until the answer: `stopped`, or an `error`
    when no session was running any more (returned; None if none came within `timeout`
    or the socket closed first). Close a socket only after it: one closed while chunks
    are on their way makes Ray Serve's proxy log two error lines for it
    (ray-project/ray#64077), which buries the server's own log."""
    with contextlib.suppress(TimeoutError, websockets.ConnectionClosed):
        await ws.send(json.dumps({"type": "stop"}))
        async with asyncio.timeout(timeout):
            while True:
                raw = await ws.recv()
                if isinstance(raw, str) and (answer := json.loads(raw)).get("type") in (
                        "stopped", "error"):
                    return answer
    return None


async def record_jam(
    url: str,
    params: dict,
    seconds: float,
    *,
    update_at: float | None = None,
    update: dict | None = None,
    on_audio: Callable[[float], None] | None = None,
    headers: dict | None = None,
) -> JamRecording:
    """Starts an `rt` jam, records `seconds` of audio, optionally sends `update` once
    `update_at` seconds have been received, and stops."""
    target = round(seconds * SAMPLE_RATE)
    pieces: list[np.ndarray] = []
    chunks: list[dict] = []
    received = 0
    pending: bytes | None = None
    # compression=None: PCM does not compress, and permessage-deflate costs ~5 ms a
    # 0.5 s chunk on both ends (scripts/bench_serve.py measured it)
    async with websockets.connect(ws_url(url), max_size=None, compression=None,
                                  additional_headers=headers) as ws:
        t0 = time.perf_counter()
        await ws.send(json.dumps({"type": "start", "mode": "rt", "binary_audio": True,
                                  "audio_format": "pcm16", "params": params}))
        rec: JamRecording | None = None
        while received < target:
            message = await ws.recv()
            if isinstance(message, bytes):
                pending = message
                continue
            data = json.loads(message)
            kind = data.get("type")
            if kind == "error":
                raise JamError(data["error"])
            if kind == "started":
                rec = JamRecording(data, np.zeros((0, CHANNELS), np.int16), chunks, 0.0)
            elif kind == "status" and data.get("event") == "updated" and rec:
                rec.update_applies_from_chunk = data["update_applies_from_chunk"]
            elif kind == "chunk_meta" and rec and pending is not None:
                now = time.perf_counter()
                audio = np.frombuffer(pending, "<i2").reshape(-1, CHANNELS)
                pending = None
                if not chunks:
                    rec.first_chunk_seconds = now - t0
                chunks.append(data["metadata"])
                pieces.append(audio)
                received += audio.shape[0]
                if (rec.update_applies_from_chunk is not None and rec.update_heard_seconds is None
                        and data["index"] >= rec.update_applies_from_chunk):
                    rec.update_heard_seconds = now - rec.update_sent_at
                if on_audio:
                    on_audio(audio.shape[0] / SAMPLE_RATE)
                if (update is not None and rec.update_sent_at is None
                        and received >= update_at * SAMPLE_RATE):
                    rec.update_sent_at = time.perf_counter()
                    await ws.send(json.dumps({"type": "update", **update}))
        rec.stopped = await stop_and_wait(ws)
    rec.audio = np.concatenate(pieces)[:target] if pieces else rec.audio
    return rec


def run(url: str, params: dict, seconds: float, **kwargs) -> JamRecording:
    return asyncio.run(record_jam(url, params, seconds, **kwargs))
