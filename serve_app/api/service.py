"""What HTTP routes and the WebSocket share: validated controls -> generator sessions."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping

import numpy as np

from ..audio import to_float
from ..audio.barclock import BarClock
from ..audio.decode import decode_audio
from ..audio.loudness import MODES as LOUDNESS_MODES
from ..audio.resample import check_rate
from ..engine import Controls
from ..errors import BadRequest, Unavailable, UnknownSession, clipped, shown
from ..frames import SAMPLE_RATE
from ..jam import MAX_CHUNK_SECONDS, StreamConfig
from ..jam_spec import BarSpec, JamSpec, JamUpdate, StyleSpec, variant_of
from ..styles import check_ramp_seconds
from ..styles.prompts import parse_floats, parse_styles
from .ab import ABSplit
from .clients import GeneratorClient, StyleClient
from .settings import ApiSettings


@dataclasses.dataclass
class ControlFields:
    """The generation controls shared by /generate_style, /jam/*, and /ws/jam messages,
    in the prototype's string forms. Every field is optional so that an update changes
    only what it names."""

    styles: str | None = None
    style_weights: str | None = None
    mean: float | None = None
    centroid_weights: str | None = None
    temperature: float | None = None
    topk: int | None = None
    guidance_weight: float | None = None
    cfg_notes: float | None = None
    cfg_drums: float | None = None
    drums: str | None = None
    notes: str | None = None

    @property
    def touches_style(self) -> bool:
        return any(v is not None for v in (self.styles, self.style_weights, self.mean,
                                            self.centroid_weights))

    def control_changes(self) -> dict:
        changes: dict = {}
        if self.temperature is not None:
            changes["temperature"] = self.temperature
        if self.topk is not None:
            changes["top_k"] = self.topk
        if self.drums is not None:
            changes["drums"] = self.drums
        cfg = {k: v for k, v in (("musiccoca", self.guidance_weight), ("notes", self.cfg_notes),
                                 ("drums", self.cfg_drums)) if v is not None}
        if cfg:
            changes["cfg"] = cfg
        return changes

    def controls(self) -> Controls:
        changes = self.control_changes()
        controls = Controls(cfg=changes.pop("cfg", {}))
        for key, value in changes.items():
            setattr(controls, key, value)
        controls.validate()
        return controls

    def parsed_notes(self) -> list[int] | None:
        if self.notes is None:
            return None
        values = parse_floats(self.notes, "notes")
        if any(v != int(v) for v in values):
            raise ValueError("notes: MIDI pitches must be whole numbers")
        return [int(v) for v in values]


class JamService:
    def __init__(
        self,
        generators: Mapping[str, GeneratorClient],
        styles: StyleClient,
        settings: ApiSettings,
    ) -> None:
        if settings.default_variant not in generators:
            raise ValueError(
                f"default_variant {settings.default_variant!r} is not among {sorted(generators)}"
            )
        self.generators = dict(generators)
        self.styles = styles
        self.settings = settings
        self.ab = ABSplit(settings.ab_split, generators) if settings.ab_split else None

    def assign(self, variant: str | None, client_id: str | None = None) -> tuple[str, str]:
        """The variant a new session runs on, and why: named in the request, drawn by the
        config's A/B split (sticky per `client_id`), or the default."""
        if variant:
            return variant, "request"
        if self.ab is not None:
            return self.ab.assign(client_id), "ab_split"
        return self.settings.default_variant, "default"

    def generator(self, variant: str | None) -> tuple[str, GeneratorClient]:
        name = variant or self.settings.default_variant
        if name not in self.generators:
            raise BadRequest(f"variant: {shown(name)} is not served here; choose one of "
                             f"{sorted(self.generators)}")
        if self.settings.template_mode:
            raise Unavailable("template mode: this deployment does not generate audio "
                              "(SPACE_MODE=template); duplicate it onto a GPU machine")
        return name, self.generators[name]

    def of_session(self, session_id: str) -> GeneratorClient:
        client = self.generators.get(variant_of(session_id))
        if client is None:
            raise UnknownSession(f"unknown session {clipped(session_id)}")
        return client

    async def style_spec(self, fields: ControlFields) -> StyleSpec:
        try:
            prompts = parse_styles(fields.styles, fields.style_weights,
                                   max_styles=self.settings.max_styles)
            centroid_weights = parse_floats(fields.centroid_weights, "centroid_weights")
        except ValueError as e:
            raise BadRequest(str(e)) from e
        texts = [text for text, _ in prompts]
        embeddings = await self.styles.embed_texts(texts) if texts else []
        return StyleSpec(texts, embeddings, [w for _, w in prompts], fields.mean or 0.0,
                         centroid_weights)

    # -- loops ----------------------------------------------------------------
    def bar_clock(self, bpm: float, beats_per_bar: int) -> BarClock:
        s = self.settings
        if not s.min_bpm <= bpm <= s.max_bpm:
            raise BadRequest(f"bpm: must be within {s.min_bpm:g}..{s.max_bpm:g}, got {bpm:g}")
        try:
            return BarClock(bpm, beats_per_bar)
        except ValueError as e:
            raise BadRequest(str(e)) from e

    def output_rate(self, target_rate: int | None, field: str = "target_sample_rate") -> int:
        """The rate audio goes out at; `field` is the name the client sent it under (the
        WebSocket's is `target_sr`)."""
        if target_rate is None:
            return SAMPLE_RATE
        try:
            return check_rate(target_rate, field)
        except ValueError as e:
            raise BadRequest(str(e)) from e

    def bar_spec(self, clock: BarClock, bars_per_chunk: int, target_rate: int | None,
                 loudness_mode: str, headroom_db: float,
                 rate_field: str = "target_sample_rate") -> BarSpec:
        if loudness_mode not in LOUDNESS_MODES:
            raise BadRequest(f"loudness_mode: must be one of {list(LOUDNESS_MODES)}, "
                             f"got {shown(loudness_mode)}")
        seconds = bars_per_chunk * clock.seconds_per_bar
        if seconds > MAX_CHUNK_SECONDS:
            raise BadRequest(f"bars_per_chunk: {bars_per_chunk} bars at {clock.bpm:g} bpm make "
                             f"{float(seconds):.1f} s chunks; at most {MAX_CHUNK_SECONDS} s")
        return BarSpec(clock, bars_per_chunk, self.output_rate(target_rate, rate_field),
                       loudness_mode, headroom_db)

    async def decode_loop(self, data: bytes | None, field: str = "loop_audio"):
        """Uploaded bytes -> float32 [n, 2] at 48 kHz (None stays None)."""
        if data is None:
            return None
        limit = self.settings.max_upload_bytes  # HTTP bodies are held to it on the way in
        if len(data) > limit:
            raise BadRequest(f"{field}: {len(data)} bytes, larger than the limit of {limit}")
        try:
            return await asyncio.to_thread(decode_audio, data, field=field,
                                           max_seconds=self.settings.max_loop_seconds)
        except ValueError as e:
            raise BadRequest(str(e)) from e

    async def with_audio_style(self, style: StyleSpec, audio: np.ndarray | None,
                               weight: float, name: str) -> StyleSpec:
        """Adds an audio clip's own MusicCoCa embedding to a style blend."""
        if audio is None or weight <= 0:
            return style
        embedding = await self.styles.embed_audio(audio, SAMPLE_RATE)
        return dataclasses.replace(style, names=[*style.names, name],
                                   embeddings=[*style.embeddings, embedding],
                                   weights=[*style.weights, weight])

    # -- sessions -------------------------------------------------------------
    async def jam_spec(self, fields: ControlFields, stream: StreamConfig,
                       seed: int | None) -> JamSpec:
        try:
            controls, notes = fields.controls(), fields.parsed_notes()
            stream.validate()
        except ValueError as e:
            raise BadRequest(str(e)) from e
        return JamSpec(await self.style_spec(fields), controls, stream, notes, seed)

    async def start(self, fields: ControlFields, stream: StreamConfig, seed: int | None,
                    variant: str | None, *, polled: bool = False, loop: np.ndarray | None = None,
                    loop_weight: float = 1.0, bar: BarSpec | None = None,
                    tempo_guidance_bpm: float | None = None,
                    client_id: str | None = None) -> tuple[dict, JamSpec]:
        variant, assigned_by = self.assign(variant, client_id)
        _, client = self.generator(variant)
        if not 0 <= loop_weight <= 10:
            raise BadRequest(f"loop_weight: must be within 0..10, got {loop_weight:g}")
        spec = await self.jam_spec(fields, stream, seed)
        spec.style = await self.with_audio_style(spec.style, loop, loop_weight, "loop")
        spec.loop, spec.bar, spec.tempo_guidance_bpm = loop, bar, tempo_guidance_bpm
        spec.polled = polled
        started = {**await client.start(spec), "assigned_by": assigned_by}
        return started, spec

    async def restart(self, session_id: str, spec: JamSpec) -> dict:
        """Starts `spec` as a new session of the variant that `session_id` ran on (a
        moved WebSocket stream's continuation, `resume.py`)."""
        _, client = self.generator(variant_of(session_id))
        return await client.start(spec)

    async def update(self, session_id: str, fields: ControlFields,
                     style_ramp_seconds: float = 0.0, *,
                     use_current_mix_as_style: bool = False) -> tuple[dict, JamUpdate]:
        """Applies an update; returns the generator's answer and the update itself (a
        WebSocket stream remembers it, to move with it)."""
        client = self.of_session(session_id)
        try:
            changes = fields.control_changes()
            notes = fields.parsed_notes()
            check_ramp_seconds(style_ramp_seconds)
        except ValueError as e:
            raise BadRequest(str(e)) from e
        style = await self.style_spec(fields) if fields.touches_style else None
        if use_current_mix_as_style:
            mix = await client.recent_audio(session_id, 10.0)
            if mix.shape[0] == 0:
                raise BadRequest("use_current_mix_as_style: the session has no audio yet")
            style = await self.with_audio_style(style or StyleSpec(), to_float(mix), 1.0,
                                                "current mix")
        update = JamUpdate(
            style=style,
            style_ramp_seconds=style_ramp_seconds,
            controls=changes or None,
            notes=notes,
        )
        return await client.update(session_id, update), update

    async def reseed(self, session_id: str, data: bytes | None,
                     anchor_bars: float | None = None) -> tuple[dict, np.ndarray]:
        """Reseeds a session; returns the generator's answer and the codes that will
        replace its context (a WebSocket stream remembers them until they apply, to
        move with them)."""
        client = self.of_session(session_id)
        if data is None:
            raise BadRequest("loop_audio: required (the new loop to jam on)")
        if anchor_bars is not None and not 0 < anchor_bars <= 16:
            raise BadRequest(
                f"anchor_bars: must be more than 0 and at most 16, got {anchor_bars:g}")
        answer = await client.reseed(session_id, await self.decode_loop(data), anchor_bars)
        codes = answer.pop("codes")
        return answer, codes

    async def stop(self, session_id: str) -> dict:
        return await self.of_session(session_id).stop(session_id)

    async def stop_all(self) -> int:
        """Ends every polled jam (`/jam/start`) of every variant, on every replica, so
        that any ingress replica can be asked; WebSocket jams and renders end with the
        request that holds them."""
        results = await asyncio.gather(*(g.stop_all() for g in self.generators.values()))
        return sum(r["stopped"] for r in results)
