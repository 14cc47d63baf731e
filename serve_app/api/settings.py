"""Limits and keys of the HTTP/WebSocket API: defaults, overridden by the config's `api:`
section, then by the environment (MRT_API_KEYS, MRT_ADMIN_KEYS, MRT_CORS_ORIGINS,
SPACE_MODE)."""

from __future__ import annotations

import os
import re
from typing import Annotated, Literal, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


def _env_list(name: str) -> list[str]:
    return [k.strip() for k in os.environ.get(name, "").split(",") if k.strip()]


def ws_max_message_bytes(max_upload_bytes: int) -> int:
    """The largest WebSocket message our servers take in: a `start` or `reseed` carrying a
    loop of `max_upload_bytes` as base64 (4/3 of it), and 1 MiB for the JSON around it.
    uvicorn's default (16 MiB) closed the socket, and the session on it, under any loop
    over 12 MB (a 33 s float32 WAV) with a bare 1009; within this limit a loop too large or
    too long gets an `error` that names it and the session plays on. Serve's proxy is
    set up before any app's config is read (deployments/proxy.py), so it takes the default
    `max_upload_bytes`; a config that raises that limit raises it for HTTP uploads only."""
    return -(-max_upload_bytes // 3) * 4 + (1 << 20)


def _origin(value: str) -> str:
    """An origin as browsers send it (scheme://host[:port], nothing after), or "*": a
    path or a trailing slash would never match a request's Origin, and a page allowed
    that way would fail in the browser with nothing said here."""
    if value != "*" and not re.fullmatch(r"https?://[^/\s?#]+", value):
        raise ValueError(f"{value!r} is not an origin: scheme://host[:port] with no path "
                         "(e.g. https://app.example.com), or '*' for any")
    return value


Origin = Annotated[str, AfterValidator(_origin)]
SpaceMode = Literal["serve", "template", "auto"]
SPACE_MODES = get_args(SpaceMode)


class ApiSettings(BaseModel):
    # extra="forbid": a misspelt setting in the `api:` section is an error naming it
    model_config = ConfigDict(allow_inf_nan=False, extra="forbid")

    default_variant: str = "tiny"
    ab_split: dict[str, float] | None = None  # weights of variants for unnamed sessions
    max_upload_bytes: int = Field(25 * 1024 * 1024, gt=0)
    max_styles: int = Field(8, ge=1)
    max_bars: int = Field(64, ge=1)
    min_bpm: float = Field(20.0, gt=0)
    max_bpm: float = Field(300.0, gt=0)
    max_render_seconds: float = Field(120.0, gt=0)
    max_loop_seconds: float = Field(60.0, gt=0)
    max_backlog_chunks: int = Field(8, ge=1)
    # WebSocket flow control: an `asap` stream never runs further ahead of the wall clock
    # than this, and a client that acks chunks never has more than its window unacked.
    ws_max_lead_seconds: float = Field(30.0, gt=0)
    ws_default_window_chunks: int = Field(4, ge=1)
    next_timeout_seconds: float = Field(10.0, gt=0)
    max_next_timeout_seconds: float = Field(60.0, gt=0)
    # how long GET /progress still answers for a finished render
    progress_retention_seconds: float = Field(600.0, gt=0)
    api_keys: list[str] = Field(default_factory=list)
    admin_keys: list[str] = Field(default_factory=list)
    # Web pages on these origins may call the HTTP API from a browser (CORS; "*": any).
    # None by default: only pages the server itself serves. Set, a browser on any other
    # origin may not change state either (security.OriginMiddleware: its WebSockets and
    # writes, which CORS does not stop, are refused).
    cors_origins: list[Origin] = Field(default_factory=list)
    space_mode: SpaceMode = "auto"

    @classmethod
    def from_config(cls, config: dict | None = None) -> ApiSettings:
        values = dict(config or {})
        if keys := _env_list("MRT_API_KEYS"):
            values["api_keys"] = keys
        if keys := _env_list("MRT_ADMIN_KEYS"):
            values["admin_keys"] = keys
        if origins := _env_list("MRT_CORS_ORIGINS"):
            try:  # named as the operator wrote it, not as a config field
                values["cors_origins"] = [_origin(o) for o in origins]
            except ValueError as e:
                raise ValueError(f"MRT_CORS_ORIGINS: {e}") from None
        if mode := os.environ.get("SPACE_MODE"):
            values["space_mode"] = mode.strip().lower()
            if values["space_mode"] not in SPACE_MODES:  # named as the operator wrote it
                raise ValueError(f"SPACE_MODE: must be one of {list(SPACE_MODES)}, got {mode!r}")
        return cls(**values)

    @property
    def template_mode(self) -> bool:
        """`template` only when asked: with no GPU the server runs on CPU instead."""
        return self.space_mode == "template"
