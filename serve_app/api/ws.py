"""`/ws/jam`: real-time jamming over one WebSocket (the prototype's `rt` protocol).

Client -> server JSON: `start` {mode, binary_audio, audio_format, params} (params flat
beside them also read), `update` (any start params, flat or under `params`), `stop`,
`ping`, `status`, `ack` {index} (optional flow control, see `flow.py`); `consume`
{chunk_index}, `reseed` {loop_audio_b64}, `reseed_splice` {loop_audio_b64, anchor_bars}.
`bar` mode jams on `loop_audio_b64` (optional) in chunks of `bars_per_chunk` whole bars
at `bpm`.
Server -> client: `started`, `chunk` (base64 audio in JSON) or a binary frame followed
by `chunk_meta`, `status`, `stopped`, `pong`, `error`. A bad message gets an `error`
and the session goes on; a disconnect stops the session at once. A session whose
generator replica stops (scale-down, crash) moves to another replica and plays on from
what the listener heard (`resume.py`): the client gets a `status` with event `moved`
and its new `session_id`, and chunk indices run on.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from typing import Any, Literal

from fastapi import WebSocket, WebSocketDisconnect
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..audio import to_wav_bytes
from ..errors import (
    TOO_DEEP,
    ApiError,
    BadRequest,
    Float,
    Int,
    SessionLost,
    either,
    field_problems,
    shown,
)
from ..jam import Chunk, StreamConfig, frames_for
from ..styles import MAX_RAMP_SECONDS
from . import offload
from .flow import FlowControl, StreamCredit
from .resume import StreamMemory
from .service import ControlFields, JamService

log = logging.getLogger(__name__)

AUDIO_FORMATS = ("wav", "pcm16")
NOT_UPDATABLE = ("chunk_seconds", "pace", "seed", "variant", "window_chunks", "bpm",
                 "beats_per_bar", "bars_per_chunk", "target_sr", "loudness_mode",
                 "headroom_db", "loop_audio_b64", "loop_weight", "tempo_guidance", "client_id")
MODES = ("rt", "bar")
# Start params only bar mode reads: an `rt` start that sends them is told they were
# ignored, not refused (the prototype's clients may send one set of params either way).
BAR_ONLY = ("loop_audio_b64", "bpm", "beats_per_bar", "bars_per_chunk", "loop_weight",
            "target_sr", "loudness_mode", "headroom_db", "tempo_guidance")
# Moves in a row without a chunk delivered in between before a stream gives up: every
# replica failing in turn is an outage, not a scale-down.
MAX_MOVES_WITHOUT_AUDIO = 3
# How long a call that found the session gone waits for the stream to move it.
MOVE_WAIT_SECONDS = 60.0


StyleNames = either(str | list[str] | None, "a comma-separated string or a list of strings")
Numbers = either(str | list[Float] | None, "a comma-separated string or a list of finite numbers")
Pitches = either(str | list[Int] | None, "a comma-separated string or a list of MIDI pitches")
Drums = either(bool | Literal["free", "on", "off"] | None, "true, false, 'free', 'on' or 'off'")


class WsParams(BaseModel):
    """Start/update parameters; list or comma-string forms are both accepted."""

    # allow_inf_nan: JSON's NaN and Infinity (Python's json reads them) get "should be a
    # finite number", not a misleading range error or, unbounded, a silent NaN.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    styles: StyleNames = None
    style_weights: Numbers = None
    temperature: Float | None = Field(None, ge=0, le=10)
    topk: Int | None = Field(None, ge=1, le=1024)
    guidance_weight: Float | None = Field(None, ge=-1, le=7)
    cfg_notes: Float | None = Field(None, ge=-1, le=7)
    cfg_drums: Float | None = Field(None, ge=-1, le=7)
    mean: Float | None = Field(None, ge=0)
    centroid_weights: Numbers = None
    notes: Pitches = None
    drums: Drums = None
    style_ramp_seconds: Float = Field(0.0, ge=0, le=MAX_RAMP_SECONDS)
    pace: Literal["realtime", "asap"] | None = None
    chunk_seconds: Float | None = Field(None, ge=0.04, le=10.0)
    seed: Int | None = Field(None, ge=0, lt=2**32)
    variant: str | None = None
    client_id: str | None = Field(None, max_length=200)
    window_chunks: Int | None = Field(None, ge=1, le=64)
    # bar mode
    loop_audio_b64: str | None = None
    bpm: Float = Field(120.0, gt=0)
    beats_per_bar: Int = Field(4, ge=1, le=32)
    bars_per_chunk: Int = Field(1, ge=1, le=64)
    loop_weight: Float = Field(1.0, ge=0, le=10)
    target_sr: Int | None = None
    loudness_mode: str = "auto"
    headroom_db: Float = Field(1.0, ge=0, le=24)
    tempo_guidance: bool = False
    use_current_mix_as_style: bool = False

    def control_fields(self) -> ControlFields:
        def joined(value):
            if isinstance(value, list):
                return ", ".join(str(v) for v in value)
            return value

        drums = self.drums
        if isinstance(drums, bool):
            drums = "on" if drums else "off"
        return ControlFields(
            styles=joined(self.styles), style_weights=joined(self.style_weights),
            mean=self.mean, centroid_weights=joined(self.centroid_weights),
            temperature=self.temperature, topk=self.topk,
            guidance_weight=self.guidance_weight, cfg_notes=self.cfg_notes,
            cfg_drums=self.cfg_drums, drums=drums, notes=joined(self.notes),
        )

    def ignored(self, mode: str = "bar") -> list[str]:
        """The params sent that `mode` does not use: unknown names (a typo is said, not
        silently dropped) and, outside bar mode, bar mode's own."""
        unused = set(self.model_extra or {})
        if mode != "bar":
            unused |= set(BAR_ONLY) & self.model_fields_set
        return sorted(unused)

    def loop_bytes(self) -> bytes | None:
        if self.loop_audio_b64 is None:
            return None
        try:
            return base64.b64decode(self.loop_audio_b64, validate=True)
        except ValueError:
            raise BadRequest("loop_audio_b64: not valid base64") from None


# A start message's own fields, beside its params.
START_FIELDS = ("type", "mode", "binary_audio", "audio_format")


def message_params(message: dict, envelope: tuple[str, ...] = ("type",)
                   ) -> tuple[dict, list[str]]:
    """A message's parameters: under `params`, or its own fields beside the `envelope`
    (the prototype's clients send both forms); and the names it does not read: fields
    beside `params` when both forms are sent, which a client is told of (they were
    dropped without a word)."""
    beside = [k for k in message if k not in envelope and k != "params"]
    if "params" not in message:
        return {k: message[k] for k in beside}, []
    if not isinstance(message["params"], dict):
        raise BadRequest("params: must be a JSON object")
    return message["params"], beside


def chunk_index(value: Any, field: str, message_type: str) -> int:
    """A chunk index a client sent (`ack`, `consume`): an integer from 0."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadRequest(f"{field}: {message_type} needs the integer index of a chunk")
    if value < 0:
        raise BadRequest(f"{field}: chunk indices start at 0, got {value}")
    return value


def parse_params(raw: dict) -> WsParams:
    """`raw` (from `message_params`, which refuses anything but an object) as params."""
    try:
        return WsParams(**raw)
    except ValidationError as e:
        raise BadRequest("; ".join(field_problems(e.errors()))) from None


class JamSocket:
    """One client connection; at most one session at a time."""

    def __init__(self, ws: WebSocket, service: JamService) -> None:
        self.ws = ws
        self.service = service
        self.session_id: str | None = None
        self.binary = False
        self.audio_format = "wav"
        self._send_lock = asyncio.Lock()
        self._pump: asyncio.Task | None = None
        self.flow: FlowControl | None = None
        self.memory: StreamMemory | None = None
        self._moving: asyncio.Future | None = None  # a move under way (`_move`)

    async def send_json(self, message: dict) -> None:
        async with self._send_lock:
            await self.ws.send_text(json.dumps(message))

    async def error(self, message: str) -> None:
        await self.send_json({"type": "error", "error": message})

    # -- messages ------------------------------------------------------------
    async def handle(self, message: dict) -> None:
        kind = message.get("type")
        if kind == "ping":
            await self.send_json({"type": "pong", "time": time.time()})
        elif kind == "start":
            await self.start(message)
        elif kind == "update":
            await self.update(message)
        elif kind == "status":
            await self.send_json({"type": "status", **await self._status()})
        elif kind == "stop":
            await self.stop()
        elif kind == "ack":
            self.ack(message)
        elif kind == "consume":
            await self.consume(message)
        elif kind in ("reseed", "reseed_splice"):
            await self.reseed(message, splice=kind == "reseed_splice")
        else:
            raise BadRequest(f"type: unknown message type {shown(kind)}; expected start, update, "
                             "stop, ping, status, ack, consume, reseed or reseed_splice")

    async def start(self, message: dict) -> None:
        if self.session_id:
            raise BadRequest("start: a session is already running on this socket; send stop")
        mode = message.get("mode", "rt")
        if mode not in MODES:
            raise BadRequest(f"mode: must be one of {list(MODES)}, got {shown(mode)}")
        audio_format = message.get("audio_format", "wav")
        if audio_format not in AUDIO_FORMATS:
            raise BadRequest(f"audio_format: must be one of {list(AUDIO_FORMATS)}")
        binary = message.get("binary_audio", False)
        if not isinstance(binary, bool):  # "no" would read as true
            raise BadRequest(f"binary_audio: must be true or false, got {shown(binary)}")
        raw, beside = message_params(message, START_FIELDS)
        params = parse_params(raw)
        service = self.service
        loop, bar, tempo = None, None, None
        chunk_seconds = params.chunk_seconds or 2.0
        if mode == "bar":
            clock = service.bar_clock(params.bpm, params.beats_per_bar)
            bar = service.bar_spec(clock, params.bars_per_chunk, params.target_sr,
                                   params.loudness_mode, params.headroom_db, "target_sr")
            loop = await service.decode_loop(params.loop_bytes(), "loop_audio_b64")
            chunk_seconds = float(params.bars_per_chunk * clock.seconds_per_bar)
            tempo = clock.bpm if params.tempo_guidance else None
        stream = StreamConfig(
            chunk_frames=frames_for(chunk_seconds),
            pace=params.pace or "realtime",
            max_backlog=service.settings.max_backlog_chunks,
        )
        started, spec = await service.start(params.control_fields(), stream, params.seed,
                                         params.variant, loop=loop,
                                         loop_weight=params.loop_weight, bar=bar,
                                         tempo_guidance_bpm=tempo, client_id=params.client_id)
        if bar is not None:
            started.update(chunk_seconds=chunk_seconds, bars_per_chunk=bar.bars_per_chunk,
                           bpm=bar.clock.bpm, beats_per_bar=bar.clock.beats_per_bar,
                           sample_rate=bar.rate)
        self.session_id = started["session_id"]
        self.memory = StreamMemory(spec)
        self.binary = binary
        self.audio_format = audio_format
        settings = self.service.settings
        self.flow = FlowControl(window=params.window_chunks,
                                default_window=settings.ws_default_window_chunks,
                                max_lead_seconds=settings.ws_max_lead_seconds)
        await self.send_json({
            "type": "started", "mode": mode, **started, "pace": stream.pace,
            "binary_audio": self.binary, "audio_format": self.audio_format,
            "ignored_params": sorted(params.ignored(mode) + beside), **self.flow.status(),
        })
        self._pump = asyncio.create_task(self._stream(self.session_id))

    async def update(self, message: dict) -> None:
        if not self.session_id:
            raise BadRequest("update: no session is running; send start first")
        raw, beside = message_params(message)
        params = parse_params(raw)
        fixed = [k for k in NOT_UPDATABLE if raw.get(k) is not None]
        if fixed:
            raise BadRequest(f"{fixed[0]}: cannot change during a session; stop and start again")
        applied, jam_update = await self._on_session(lambda sid: self.service.update(
            sid, params.control_fields(), params.style_ramp_seconds,
            use_current_mix_as_style=params.use_current_mix_as_style))
        self.memory.update(jam_update)
        await self.send_json({
            "type": "status", "event": "updated",
            "update_applies_from_chunk": self.memory.client_index(applied["applies_from_chunk"]),
            "update_applies_from_frame":
                applied["applies_from_frame"] + self.memory.frame_offset,
            "ignored_params": sorted(params.ignored() + beside),
        })

    def ack(self, message: dict) -> None:
        if not self.session_id or self.flow is None:
            raise BadRequest("ack: no session is running")
        index = chunk_index(message.get("index"), "index", "ack")
        try:
            self.flow.ack(index)
        except ValueError as e:
            raise BadRequest(str(e)) from None

    async def consume(self, message: dict) -> None:
        """Bar mode's acknowledgement: frees the chunk on the generator and counts as an
        `ack` for flow control."""
        if not self.session_id:
            raise BadRequest("consume: no session is running")
        index = chunk_index(message.get("chunk_index", message.get("index")), "chunk_index",
                            "consume")
        own = self.memory.session_index(index)
        if own >= 0:  # not a chunk of the session before a move
            await self._on_session(lambda sid: self.service.of_session(sid).consume(sid, own))
        if self.flow is not None and index <= self.flow.last_sent:
            self.flow.ack(index)

    async def reseed(self, message: dict, *, splice: bool) -> None:
        if not self.session_id:
            raise BadRequest(f"{message.get('type')}: no session is running")
        raw, _ = message_params(message)  # a reseed's answer lists nothing
        data = parse_params({"loop_audio_b64": raw.get("loop_audio_b64")}).loop_bytes()
        anchor = raw.get("anchor_bars", 1.0) if splice else None
        if anchor is not None and (isinstance(anchor, bool) or not isinstance(anchor, int | float)):
            raise BadRequest("anchor_bars: must be a number")
        result, codes = await self._on_session(
            lambda sid: self.service.reseed(sid, data, anchor))
        result["applies_from_chunk"] = self.memory.client_index(result["applies_from_chunk"])
        self.memory.reseeded(codes, result["applies_from_chunk"])
        await self.send_json({"type": "status", "event": message.get("type"), **result})

    async def stop(self) -> None:
        if not self.session_id:
            raise BadRequest("stop: no session is running")
        result = await self._end_session()
        await self.send_json({"type": "stopped", **result})

    async def _status(self) -> dict:
        if not self.session_id:
            return {"session_id": None, "running": False}
        status = await self._on_session(lambda sid: self.service.of_session(sid).status(sid))
        memory = self.memory
        for key in ("last_delivered", "last_consumed"):  # as this client counts chunks
            if status.get(key, -1) >= 0:
                status[key] = memory.client_index(status[key])
        status["chunks_generated"] = memory.client_index(status.get("chunks_generated", 0))
        return {**status, "moves": memory.moves, **(self.flow.status() if self.flow else {})}

    async def _on_session(self, call):
        """`call(session_id)` on the running session. If the session's replica is gone,
        the stream moves it (`_move`): wait for that, then call the new session."""
        session_id = self.session_id
        try:
            return await call(session_id)
        except SessionLost:
            deadline = time.monotonic() + MOVE_WAIT_SECONDS
            while self.session_id == session_id and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if self.session_id is None or self.session_id == session_id:
                raise
            return await call(self.session_id)

    # -- audio out -----------------------------------------------------------
    async def _stream(self, session_id: str) -> None:
        flow, memory = self.flow, self.memory
        moves_without_audio = 0
        try:
            while self.session_id == session_id:
                # one stream per session (GeneratorCore.chunks); flow control holds the
                # next pull back, the credit the generator, once its backlog is full
                client, credit = self.service.of_session(session_id), StreamCredit()
                chunks = client.chunks(session_id, credit.size)
                try:
                    while True:
                        await flow.wait_for_room()
                        chunk = await anext(chunks, None)
                        if chunk is None:
                            return  # stopped or finished
                        chunk = memory.played(chunk)
                        await self._send_chunk(chunk)
                        flow.sent(chunk)
                        moves_without_audio = 0
                        if more := credit.took():
                            await client.grant(session_id, more)
                except SessionLost as lost:
                    if moves_without_audio >= MAX_MOVES_WITHOUT_AUDIO:
                        raise
                    session_id = await self._move(session_id, lost)
                    moves_without_audio += 1
                finally:
                    await chunks.aclose()
        except ApiError as e:
            if self.session_id == session_id:
                self.session_id = None
                await self.error(e.message)
        except (WebSocketDisconnect, RuntimeError):
            pass  # the socket closed under us; the receive loop cleans up
        except Exception as e:  # a fault of ours: the client is told, not left waiting
            log.exception("stream of session %s failed", session_id)
            if self.session_id == session_id:
                self.session_id = None
                await self.error(f"internal error: the stream stopped ({type(e).__name__}); "
                                 "start a new session")

    async def _move(self, session_id: str, lost: SessionLost) -> str:
        """Starts the stream's continuation on another replica and returns its session
        id. Shielded from the stream's cancellation: a stop that comes while the new
        session starts must stop that session too, not leave it playing unheard until
        it expires."""
        self._moving = asyncio.ensure_future(self._restart(session_id, lost))
        return await asyncio.shield(self._moving)

    async def _restart(self, session_id: str, lost: SessionLost) -> str:
        continuation = self.memory.continuation()
        try:
            started = await self.service.restart(session_id, continuation.spec)
        except ApiError as e:
            raise e.reworded(f"{lost.reason}; moving the stream to another replica failed: "
                             f"{e.message}{SessionLost.ADVICE}") from e
        new_id = started["session_id"]
        if self.session_id != session_id:  # stopped meanwhile
            await self.service.stop(new_id)
            return new_id
        self.memory.moved(continuation)
        self.session_id = new_id
        log.info("session %s moved to %s: %s", session_id, new_id, lost.reason)
        await self.send_json({
            "type": "status", "event": "moved", "session_id": new_id,
            "previous_session_id": session_id, "reason": lost.reason,
            "next_index": continuation.index, "moves": self.memory.moves,
            "context_frames": int(started.get("prefill_frames", 0)),
            **({"reseed_applies_from_chunk": waiting}
               if (waiting := self.memory.reseed_waiting) is not None else {}),
        })
        return new_id

    async def _send_chunk(self, chunk: Chunk) -> None:
        # Binary pcm16 is a copy of the samples (3 ms for the longest chunk): always inline.
        plain = self.binary and self.audio_format == "pcm16"
        seconds = 0.0 if plain else chunk.seconds
        audio, text = await offload.encode(seconds, lambda: self._encode(chunk))
        async with self._send_lock:
            if audio is not None:
                await self.ws.send_bytes(audio)
            await self.ws.send_text(text)

    def _encode(self, chunk: Chunk) -> tuple[bytes | None, str]:
        """A chunk as this client asked for it: a binary frame and its `chunk_meta`, or
        one `chunk` message with the audio in base64."""
        if self.audio_format == "pcm16":
            payload = chunk.audio.astype("<i2").tobytes()
        else:
            payload = to_wav_bytes(chunk.audio, chunk.rate)
        metadata = {**chunk.metadata(), "audio_format": self.audio_format,
                    "sent_at": time.time()}
        if self.binary:
            return payload, json.dumps(
                {"type": "chunk_meta", "index": chunk.index, "metadata": metadata})
        return None, json.dumps({
            "type": "chunk", "index": chunk.index,
            "audio_base64": base64.b64encode(payload).decode(), "metadata": metadata,
        })

    async def _end_session(self) -> dict:
        session_id, self.session_id = self.session_id, None
        if self._pump:
            self._pump.cancel()
            self._pump = None
        if session_id is None:
            return {}
        try:
            return await self.service.of_session(session_id).stop(session_id)
        except ApiError:
            return {"session_id": session_id, "stopped": True}

    # -- connection ----------------------------------------------------------
    async def run(self) -> None:
        await self.ws.accept()
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    return
                text = message.get("text")
                if text is None:
                    await self.error("message: send JSON text messages, not binary")
                    continue
                try:
                    payload = json.loads(text)
                except json.JSONDecodeError as e:
                    await self.error(f"message: not valid JSON ({e.msg})")
                    continue
                except RecursionError:  # '[' * 100000: it closed the socket
                    await self.error(f"message: {TOO_DEEP}")
                    continue
                if not isinstance(payload, dict):
                    await self.error("message: must be a JSON object with a 'type'")
                    continue
                try:
                    await self.handle(payload)
                except ApiError as e:
                    await self.error(e.message)
                except WebSocketDisconnect:
                    raise
                except Exception as e:  # a fault of ours: it ends this message, not the jam
                    kind = payload.get("type")
                    log.exception("ws: a %r message failed", kind)
                    await self.error(f"{kind}: the server failed on this message "
                                     f"({type(e).__name__}; in its log); the session goes on")
        except WebSocketDisconnect:
            return
        finally:
            await self._end_session()
