"""Optional API keys, request-size limits and the origins a browser may change the
server's state from, as plain ASGI middleware.

No keys configured means open access (local use). With keys, every HTTP route
and the WebSocket need one (header `X-API-Key`, `Authorization: Bearer`, or
`?api_key=` for browsers' WebSockets); `/model/*` writes need an admin key, and so
does naming a directory of the server's disk where a repo is asked for
(`may_read_local_paths`).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from urllib.parse import parse_qs, urlsplit

from starlette.datastructures import Headers

from .settings import ApiSettings


def _key_from_scope(scope) -> bytes | None:
    """The key as the bytes the client sent: a header's raw bytes (Starlette decodes them
    as latin-1, which gives them back exactly), the query's percent-decoded. Compared as
    bytes, a key with a non-ASCII character is only a wrong key (as str, `compare_digest`
    refused it and the request was a 500)."""
    headers = Headers(scope=scope)
    if "x-api-key" in headers:
        return headers["x-api-key"].encode("latin-1")
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip().encode("latin-1")
    # latin-1 both ways: each byte (raw or percent-escaped) one character, and back
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"), encoding="latin-1")
    return query["api_key"][0].encode("latin-1") if "api_key" in query else None


def open_to_the_network(host: str, settings: ApiSettings) -> str | None:
    """What to warn of when a server with no keys listens beyond this machine: no keys is
    meant for local use (`mrt-serve local --host 0.0.0.0` on a lab machine is not)."""
    if settings.api_keys or settings.admin_keys:
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:  # a name
        if host == "localhost":
            return None
    return (f"no API keys, and listening on {host}: anyone who reaches this port may jam, "
            "switch models and name directories of this machine as repos; set MRT_API_KEYS "
            "and MRT_ADMIN_KEYS")


# Set by ApiKeyMiddleware in each request's scope when keys are configured.
_LOCAL_PATHS = "mrt.may_read_local_paths"


def may_read_local_paths(scope) -> bool:
    """Whether this request may name local directories as repos: with no keys
    configured (local use) anyone may, with keys only an admin key may."""
    return scope.get(_LOCAL_PATHS, True)


def _matches(key: bytes | None, allowed: list[str]) -> bool:
    return key is not None and any(hmac.compare_digest(key, k.encode()) for k in allowed)


def _is_admin_write(scope) -> bool:
    return scope["type"] == "http" and scope["method"] != "GET" and scope["path"].startswith(
        "/model/"
    )


async def _reject(scope, receive, send, status: int, message: str) -> None:
    if scope["type"] == "websocket":
        # Closed before the handshake, a WebSocket is refused with a bare HTTP 403 that
        # a browser's app cannot even read; accepted and then closed, the client gets a
        # close code (4401: no valid key) and the reason, as it gets every other error.
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.close", "code": 4401 if status == 401 else 4403,
                    "reason": message})
        return
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


class ApiKeyMiddleware:
    def __init__(self, app, settings: ApiSettings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope, receive, send):
        s = self.settings
        if scope["type"] not in ("http", "websocket") or not (s.api_keys or s.admin_keys):
            return await self.app(scope, receive, send)
        key = _key_from_scope(scope)
        scope[_LOCAL_PATHS] = _matches(key, s.admin_keys)
        if _is_admin_write(scope):
            if not _matches(key, s.admin_keys):
                return await _reject(scope, receive, send, 403,
                                     "api key: /model/* changes need an admin key")
        elif not _matches(key, s.api_keys + s.admin_keys):
            return await _reject(scope, receive, send, 401,
                                 "api key: missing or not valid (X-API-Key header)")
        return await self.app(scope, receive, send)


# what a page may send another site without asking first (CORS's "simple" requests are
# POSTs too, so only these are safe): everything else changes the server's state
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _host_of(origin: str) -> str | None:
    """An Origin's host[:port], as a Host header names it; None for one that is no URL
    (`http://[::1` made urlsplit raise, and the request a 500)."""
    try:
        return urlsplit(origin).netloc.lower()
    except ValueError:
        return None


class OriginMiddleware:
    """With `cors_origins` configured, a browser may change the server's state only from
    those origins or from the server's own pages: a WebSocket (browsers apply no CORS to
    WebSockets) and any HTTP request but GET/HEAD/OPTIONS. CORS keeps other sites from
    reading answers, not from sending: a page on any site could POST a form to
    `/jam/stop_all` or start renders (no preflight for a form). Clients that are not
    browsers send no Origin and pass."""

    def __init__(self, app, origins: list[str]) -> None:
        self.app = app
        self.origins = origins

    async def __call__(self, scope, receive, send):
        if "*" not in self.origins and (
                scope["type"] == "websocket"
                or (scope["type"] == "http" and scope["method"] not in _SAFE_METHODS)):
            headers = Headers(scope=scope)
            origin = headers.get("origin")
            if (origin is not None and origin not in self.origins
                    and _host_of(origin) != headers.get("host", "").lower()):
                what = ("open a WebSocket" if scope["type"] == "websocket"
                        else f"send {scope['method']} requests")
                return await _reject(scope, receive, send, 403,
                                     f"origin: {origin} may not {what} here "
                                     "(not in api.cors_origins)")
        return await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """413 for bodies over the limit, counted as they stream in (no Content-Length trust)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _reject(scope, receive, send, 413, self._message())
        seen = 0

        async def counting_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _TooLarge()
            return message

        try:
            await self.app(scope, counting_receive, send)
        except _TooLarge:
            await _reject(scope, receive, send, 413, self._message())

    def _message(self) -> str:
        return f"request body: larger than the limit of {self.max_bytes} bytes"


class _TooLarge(Exception):
    pass
