"""The HTTP API (the prototype's routes, serving Magenta RT 2), built around clients.

`create_app` takes the generator clients (one per variant) and the style client;
it knows nothing of Ray. Requests are validated here (fields named in every
error), styles are embedded through the style client, and the data path is:
request -> JamSpec -> generator session -> chunks -> base64 WAV.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import time
from collections.abc import Iterable, Mapping
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile, WebSocket
from fastapi.responses import HTMLResponse, JSONResponse

from ..audio import to_int16, to_wav_bytes
from ..audio.barclock import BarClock
from ..audio.loudness import LoudnessMatcher, fade_edges
from ..audio.resample import check_rate, resample, resample_int16
from ..errors import BadRequest, NotReady, Unavailable
from ..frames import CHANNELS, SAMPLE_RATE
from ..jam import StreamConfig, frames_for
from ..jam_spec import variant_of
from ..progress import MemoryProgressStore, ProgressBoard, ProgressStore, SetStage
from ..styles import MAX_RAMP_SECONDS
from ..web import page
from . import offload
from .clients import GeneratorClient, StyleClient
from .cors import CORSWithNamedErrors
from .http_errors import add_error_handlers
from .models import add_model_routes
from .security import ApiKeyMiddleware, BodyLimitMiddleware, OriginMiddleware
from .service import ControlFields, JamService
from .settings import ApiSettings
from .ws import JamSocket

log = logging.getLogger(__name__)


# the session a polled-jam call is about: an empty one is named as missing, not unknown
SessionIdForm = Annotated[str, Form(min_length=1)]
SessionIdQuery = Annotated[str, Query(min_length=1)]


def NumberForm(default: Any, **constraints: Any) -> Any:
    """A number form field that refuses NaN and infinity by name: float() reads "nan" and
    "inf", and a NaN weight or scale turns a whole render into silence or noise."""
    return Form(default, allow_inf_nan=False, **constraints)


def _form_names(dependant: Any) -> set[str]:
    """The form fields a route reads, with its dependencies' (`ControlsForm`, ...)."""
    names = {field.alias for field in dependant.body_params}
    for sub in dependant.dependencies:
        names |= _form_names(sub)
    return names


@dataclasses.dataclass(frozen=True)
class SentFields:
    """The form fields a request sent, and those its route reads: for the answer's
    `ignored_params`, so that a misspelt name is said, not dropped silently (as on the
    WebSocket)."""

    sent: frozenset[str]
    read: frozenset[str]

    def ignored(self, unused: Iterable[str] = ()) -> list[str]:
        """The names sent that the route does not read, and those of `unused` (read, but
        not used by this request: a frame-mode jam's bar settings) that were sent."""
        return sorted((self.sent - self.read) | (self.sent & set(unused)))


async def _sent_fields(request: Request) -> SentFields:
    # the form FastAPI already parsed (Starlette keeps it)
    sent = frozenset((await request.form()).keys())
    return SentFields(sent, frozenset(_form_names(request.scope["route"].dependant)))


SentForm = Annotated[SentFields, Depends(_sent_fields)]
# What a frame-mode /jam/start (chunk_seconds, no loop) reads and does not use: bar mode's
# settings; its audio's rate is /jam/next's target_sample_rate.
FRAME_MODE_UNUSED = ("bars_per_chunk", "loop_weight", "loudness_mode", "loudness_headroom_db",
                     "target_sample_rate")


def control_fields(
    styles: str | None = Form(None, description='comma-separated, e.g. "acid house, strings"'),
    style_weights: str | None = Form(None, description='comma-separated, e.g. "1.0, 0.5"'),
    mean: float | None = NumberForm(None, ge=0, description="weight of the finetune's mean style"),
    centroid_weights: str | None = Form(None, description="weights of the finetune's centroids"),
    temperature: float | None = NumberForm(None, ge=0, le=10),
    topk: int | None = Form(None, ge=1, le=1024),
    guidance_weight: float | None = NumberForm(None, ge=-1, le=7, description="style CFG scale"),
    cfg_notes: float | None = NumberForm(None, ge=-1, le=7),
    cfg_drums: float | None = NumberForm(None, ge=-1, le=7),
    drums: str | None = Form(None, description="free | on | off"),
    notes: str | None = Form(None, description="held MIDI pitches, e.g. 60,64,67"),
) -> ControlFields:
    return ControlFields(styles, style_weights, mean, centroid_weights, temperature, topk,
                         guidance_weight, cfg_notes, cfg_drums, drums, notes)


ControlsForm = Depends(control_fields)
CLIENT_ID_HELP = "stable id of the client: keeps its A/B variant the same across sessions"


@dataclasses.dataclass
class RenderFields:
    """The form fields /generate and /generate_style share (bpm differs: required with a
    loop, 120 by default without)."""

    bars: int
    beats_per_bar: int
    target_sample_rate: int | None
    intro_bars_to_drop: int
    request_id: str | None
    seed: int | None
    variant: str | None
    tempo_guidance: bool
    client_id: str | None


def render_fields(
    bars: int = Form(8, ge=1),
    beats_per_bar: int = Form(4),
    target_sample_rate: int | None = Form(None),
    intro_bars_to_drop: int = Form(0, ge=0),
    request_id: str | None = Form(None, max_length=200),
    seed: int | None = Form(None, ge=0, lt=2**32),
    variant: str | None = Form(None),
    tempo_guidance: bool = Form(False, description="experimental: drum pulses on beats"),
    client_id: str | None = Form(None, max_length=200, description=CLIENT_ID_HELP),
) -> RenderFields:
    return RenderFields(bars, beats_per_bar, target_sample_rate, intro_bars_to_drop,
                        request_id, seed, variant, tempo_guidance, client_id)


RenderForm = Depends(render_fields)


def chunk_b64(chunk, target_rate: int | None = None) -> dict:
    audio, rate = chunk.audio, chunk.rate
    metadata = chunk.metadata()
    if target_rate and target_rate != rate:
        if rate != SAMPLE_RATE:
            raise BadRequest(f"target_sample_rate: this bar-mode jam streams at {rate} Hz "
                             "(its target_sample_rate); ask for that or none")
        samples = round(audio.shape[0] * target_rate / SAMPLE_RATE)
        audio, rate = resample_int16(audio, target_rate, samples), target_rate
        metadata.update(sample_rate=rate, samples=samples)
    return {
        "index": chunk.index,
        "audio_base64": base64.b64encode(to_wav_bytes(audio, rate)).decode(),
        "metadata": metadata,
    }


def finish_render(audio: np.ndarray, clock: BarClock, intro_bars: int, bars: int, rate: int,
                  matcher: LoudnessMatcher | None) -> tuple[str, dict, int]:
    """A render's generated audio (int16 at 48 kHz) -> its bars at `rate`, loudness matched,
    faded at the edges, as base64 WAV; with the loudness report and its length in samples.

    Up to a second of CPU for the longest renders (60 bars with loudness matching on the
    2-core dev box), so the routes run it in a thread: on the event loop it would hold
    up every jam this replica streams meanwhile."""
    start = clock.boundary(intro_bars)
    body = resample(audio[start:start + clock.samples(bars)], rate, clock.samples(bars, rate))
    loudness = {"mode": "none"}
    if matcher is not None:
        body, loudness = matcher.apply(body, [clock.boundary(b, rate) for b in range(bars)])
    out = to_int16(fade_edges(body, rate=rate))
    return base64.b64encode(to_wav_bytes(out, rate)).decode(), loudness, int(out.shape[0])


def create_app(
    generators: Mapping[str, GeneratorClient],
    styles: StyleClient,
    settings: ApiSettings | None = None,
    progress_store: ProgressStore | None = None,
) -> FastAPI:
    """`progress_store` holds renders' progress for `/progress`: one that every replica of
    this app shares (default: this process's own)."""
    settings = settings or ApiSettings()
    service = JamService(generators, styles, settings)
    board = ProgressBoard(progress_store or MemoryProgressStore(),
                          settings.progress_retention_seconds)
    app = FastAPI(
        title="mrt-serve",
        version="0.1.0",
        description="Magenta RealTime 2 as a service: style jams over HTTP and WebSocket.",
    )

    add_error_handlers(app)

    # -- service -------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def landing():
        return page("index.html")

    @app.get("/ping")
    async def ping():
        return {"ok": True, "time": time.time()}

    @app.get("/health")
    async def health():
        if settings.template_mode:
            return {"status": "template", "mode": "template", "variants": {}}
        reports = await asyncio.gather(styles.health(),
                                       *(g.health() for g in generators.values()),
                                       return_exceptions=True)
        parts = [report if isinstance(report, dict) else {"state": "error", "error": str(report)}
                 for report in reports]
        style_health, variants = parts[0], dict(zip(generators, parts[1:], strict=True))
        states = {v["state"] for v in parts}
        status = ("ready" if states == {"ready"} else
                  "error" if "error" in states else "initializing")
        return {"status": status, "mode": "serve", "default_variant": settings.default_variant,
                "variants": variants, "styles": style_health}

    # -- fixed-length renders ------------------------------------------------
    async def render_bars(
        controls: ControlFields, clock: BarClock, render: RenderFields, rate: int,
        set_stage: SetStage, ignored: list[str], *,
        loop: np.ndarray | None = None, loop_weight: float = 1.0,
        loudness_mode: str = "none", headroom_db: float = 1.0,
    ) -> JSONResponse:
        """`bars` bars (after `intro_bars` dropped) at `rate`: exactly
        round(bars * seconds_per_bar * rate) samples, continuing `loop` when given."""
        bars, intro_bars = render.bars, render.intro_bars_to_drop
        tempo_guidance = render.tempo_guidance
        if bars + intro_bars > settings.max_bars:
            raise BadRequest(f"bars: at most {settings.max_bars} bars per request "
                             f"(intro included), got {bars + intro_bars}")
        seconds = (bars + intro_bars) * clock.seconds_per_bar
        if seconds > settings.max_render_seconds:
            raise BadRequest(f"bars: {float(seconds):.1f} s of audio exceeds the limit of "
                             f"{settings.max_render_seconds:g} s")
        matcher = None
        if loop is not None:
            try:
                matcher = LoudnessMatcher(loop, loudness_mode, headroom_db, rate)
            except ValueError as e:
                raise BadRequest(str(e)) from e
        frames = clock.frames_to_cover(bars + intro_bars)
        stream = StreamConfig(chunk_frames=frames, pace="asap", max_backlog=1,
                              total_frames=frames)
        started, spec = await service.start(
            controls, stream, render.seed, render.variant, loop=loop,
            loop_weight=loop_weight, client_id=render.client_id,
            tempo_guidance_bpm=clock.bpm if tempo_guidance else None)
        sid = started["session_id"]
        name, client = variant_of(sid), service.of_session(sid)
        try:
            await set_stage("generating", variant=name, session_id=sid, total=frames)
            chunk = await client.next_chunk(sid, settings.max_render_seconds * 10)
            if chunk is None:
                raise Unavailable("generation did not finish in time")
            await set_stage("finishing", n=frames)
        finally:
            await client.stop(sid)
        wav, loudness, samples = await asyncio.to_thread(
            finish_render, chunk.audio, clock, intro_bars, bars, rate, matcher)
        c = spec.controls
        body = {
            "audio_base64": wav,
            "metadata": {
                "bpm": clock.bpm, "bars": bars, "beats_per_bar": clock.beats_per_bar,
                "styles": spec.style.names, "style_weights": spec.style.weights,
                "loop_weight": loop_weight if loop is not None else None,
                "loudness": loudness, "sample_rate": rate, "channels": CHANNELS,
                "total_samples": samples,
                "seconds_per_bar": float(clock.seconds_per_bar),
                "loop_duration_seconds": None if loop is None else loop.shape[0] / SAMPLE_RATE,
                "context_frames": started.get("prefill_frames"),
                "intro_bars_dropped": intro_bars,
                "guidance_weight": c.cfg["musiccoca"], "temperature": c.temperature,
                "topk": c.top_k, "variant": name, "seed": started["seed"],
                "tempo_guidance": tempo_guidance,
            },
            "request_id": render.request_id,
            "ignored_params": ignored,
        }
        # a long render's JSON is tens of MB: rendered (in the constructor) off the loop too
        response = await asyncio.to_thread(JSONResponse, body)
        await set_stage("done")
        return response

    @app.post("/generate")
    async def generate(
        loop_audio: UploadFile = File(..., description="the loop to continue (WAV/FLAC/OGG/MP3)"),
        controls: ControlFields = ControlsForm,
        render: RenderFields = RenderForm,
        bpm: float = NumberForm(...),
        loop_weight: float = NumberForm(1.0, ge=0, le=10),
        loudness_mode: str = Form("auto"),
        loudness_headroom_db: float = NumberForm(1.0, ge=0, le=24),
        fields: SentForm = None,
    ):
        async with board.tracking(render.request_id) as set_stage:
            clock = service.bar_clock(bpm, render.beats_per_bar)
            rate = service.output_rate(render.target_sample_rate)
            await set_stage("decoding")
            loop = await service.decode_loop(await loop_audio.read())
            return await render_bars(
                controls, clock, render, rate, set_stage, fields.ignored(), loop=loop,
                loop_weight=loop_weight, loudness_mode=loudness_mode,
                headroom_db=loudness_headroom_db)

    @app.post("/generate_style")
    async def generate_style(
        controls: ControlFields = ControlsForm,
        render: RenderFields = RenderForm,
        bpm: float = NumberForm(120.0),
        fields: SentForm = None,
    ):
        async with board.tracking(render.request_id) as set_stage:
            clock = service.bar_clock(bpm, render.beats_per_bar)
            return await render_bars(controls, clock, render,
                                     service.output_rate(render.target_sample_rate), set_stage,
                                     fields.ignored())

    @app.get("/progress")
    async def get_progress(request_id: str = Query(...)):
        """A render's stage and frames, `{n, total, percent, stage}`, from any replica."""
        return await board.read(request_id, generators)

    # -- polling jams ----------------------------------------------------------
    @app.post("/jam/start")
    async def jam_start(
        controls: ControlFields = ControlsForm,
        loop_audio: UploadFile | None = File(None, description="a loop: starts a bar-mode jam"),
        bpm: float = NumberForm(120.0),
        beats_per_bar: int = Form(4),
        bars_per_chunk: int | None = Form(None, ge=1, le=64),
        chunk_seconds: float | None = NumberForm(None, ge=0.04),  # one frame, as /ws/jam
        pace: str = Form("asap"),
        seed: int | None = Form(None, ge=0, lt=2**32),
        variant: str | None = Form(None),
        style_ramp_seconds: float = NumberForm(0.0, ge=0, le=MAX_RAMP_SECONDS),
        loop_weight: float = NumberForm(1.0, ge=0, le=10),
        loudness_mode: str = Form("auto"),
        loudness_headroom_db: float = NumberForm(1.0, ge=0, le=24),
        target_sample_rate: int | None = Form(None),
        tempo_guidance: bool = Form(False, description="experimental: drum pulses on beats"),
        client_id: str | None = Form(None, max_length=200, description=CLIENT_ID_HELP),
        fields: SentForm = None,
    ):
        """A loop or `bars_per_chunk` makes a bar-mode jam (chunks of whole bars on an exact
        grid); `chunk_seconds` alone makes a frame-mode jam."""
        del style_ramp_seconds  # a jam's first style has nothing to glide from
        clock = service.bar_clock(bpm, beats_per_bar)
        loop = await service.decode_loop(await loop_audio.read() if loop_audio else None)
        bar = None
        if chunk_seconds is None or loop is not None:
            bar = service.bar_spec(clock, bars_per_chunk or 1, target_sample_rate, loudness_mode,
                           loudness_headroom_db)
            chunk_seconds = float(bar.bars_per_chunk * clock.seconds_per_bar)
        stream = StreamConfig(chunk_frames=frames_for(chunk_seconds), pace=pace,
                              max_backlog=settings.max_backlog_chunks)
        started, _ = await service.start(
            controls, stream, seed, variant, loop=loop, loop_weight=loop_weight, bar=bar,
            tempo_guidance_bpm=clock.bpm if tempo_guidance else None, client_id=client_id,
            polled=True)
        if bar is not None:
            started.update(mode="bar", chunk_seconds=chunk_seconds,
                           bars_per_chunk=bar.bars_per_chunk, bpm=clock.bpm,
                           beats_per_bar=clock.beats_per_bar, sample_rate=bar.rate)
        return {**started,
                "ignored_params": fields.ignored(() if bar is not None else FRAME_MODE_UNUSED)}

    @app.get("/jam/next")
    async def jam_next(
        session_id: SessionIdQuery,
        timeout: float | None = Query(None, gt=0, allow_inf_nan=False),
        target_sample_rate: int | None = Query(None),
    ):
        limit = min(timeout or settings.next_timeout_seconds, settings.max_next_timeout_seconds)
        if target_sample_rate is not None:
            try:
                check_rate(target_sample_rate)
            except ValueError as e:
                raise BadRequest(str(e)) from e
        chunk = await service.of_session(session_id).next_chunk(session_id, limit)
        if chunk is None:
            raise NotReady(f"no chunk ready within {limit:g} s; call again")
        return await offload.encode(
            chunk.seconds, lambda: JSONResponse({"chunk": chunk_b64(chunk, target_sample_rate)}))

    @app.post("/jam/consume")
    async def jam_consume(session_id: SessionIdForm, chunk_index: int = Form(...)):
        return await service.of_session(session_id).consume(session_id, chunk_index)

    @app.post("/jam/update")
    async def jam_update(
        session_id: SessionIdForm,
        controls: ControlFields = ControlsForm,
        style_ramp_seconds: float = NumberForm(0.0, ge=0, le=MAX_RAMP_SECONDS),
        use_current_mix_as_style: bool = Form(False),
        fields: SentForm = None,
    ):
        applied, _ = await service.update(session_id, controls, style_ramp_seconds,
                                          use_current_mix_as_style=use_current_mix_as_style)
        return {**applied, "ignored_params": fields.ignored()}

    @app.post("/jam/reseed")
    async def jam_reseed(session_id: SessionIdForm, loop_audio: UploadFile = File(...)):
        """A new loop: the session's context restarts from it at the next chunk."""
        answer, _ = await service.reseed(session_id, await loop_audio.read())
        return answer

    @app.post("/jam/reseed_splice")
    async def jam_reseed_splice(
        session_id: SessionIdForm,
        loop_audio: UploadFile = File(...),
        anchor_bars: float = NumberForm(1.0, gt=0, le=16),
    ):
        """New audio spliced in, keeping the last `anchor_bars` bars of what the session
        has been playing at the end of its context, so it carries on from there."""
        answer, _ = await service.reseed(session_id, await loop_audio.read(), anchor_bars)
        return answer

    @app.get("/jam/status")
    async def jam_status(session_id: SessionIdQuery):
        return await service.of_session(session_id).status(session_id)

    @app.post("/jam/stop")
    async def jam_stop(request: Request):
        return await service.stop(await _session_id_from_body(request))

    @app.post("/jam/stop_all")
    async def jam_stop_all():
        return {"stopped": await service.stop_all()}

    @app.websocket("/ws/jam")
    async def ws_jam(ws: WebSocket):
        await JamSocket(ws, service).run()

    @app.get("/tester", response_class=HTMLResponse, include_in_schema=False)
    async def tester():
        return page("tester.html")

    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes)
    add_model_routes(app, service)
    app.add_middleware(ApiKeyMiddleware, settings=settings)
    if settings.cors_origins:
        app.add_middleware(OriginMiddleware, origins=settings.cors_origins)
        # outside the key check: a browser's preflight carries no key, and a refusal
        # (401, 403) must carry the CORS headers for the page to read why
        app.add_middleware(CORSWithNamedErrors, allow_origins=settings.cors_origins,
                           allow_methods=["*"], allow_headers=["*"])
    return app


async def _session_id_from_body(request: Request) -> str:
    """The prototype sends JSON `{"session_id": ...}`; forms are accepted too."""
    content_type = request.headers.get("content-type", "")
    try:
        if content_type.startswith("application/json"):
            data = await request.json()
        else:
            data = dict(await request.form())
    except Exception as e:
        raise BadRequest(f"body: not valid JSON or form data ({e})") from e
    session_id = data.get("session_id") if isinstance(data, dict) else None
    if not isinstance(session_id, str) or not session_id:
        raise BadRequest("session_id: required (JSON body {\"session_id\": \"...\"})")
    return session_id

