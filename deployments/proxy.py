"""Ray Serve proxy hook: WebSocket audio without permessage-deflate.

Browsers offer permessage-deflate on every WebSocket and Serve's proxy (uvicorn) accepts it,
so each audio chunk was deflated in the proxy and inflated in the browser for nothing: PCM
does not compress. Measured with scripts/bench_serve.py (tiny, 2-core box, 1 session, a
client that offers deflate, this hook off and on alternated): 8.3 / 8.6 -> 4.6 / 5.5 ms
overhead per 0.5 s chunk, 19.8 / 21.1 -> 6.1 / 8.4 ms per 2 s chunk. Serve exposes no
option for it; its proxy does run a callback from RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH
before it builds its uvicorn server, and this is that callback. The variable must be in
the environment of the processes that start Ray's nodes (scripts/serve and
configs/rayservice.yaml set it).
"""

from __future__ import annotations

import functools
import logging

from serve_app.api.settings import ApiSettings, ws_max_message_bytes

PROXY_CALLBACK_ENV = {
    "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "deployments.proxy:without_ws_compression",
}

log = logging.getLogger("mrt_serve.proxy")
# a loop as large as an upload may be, in a WebSocket message (settings.ws_max_message_bytes)
WS_MAX_MESSAGE_BYTES = ws_max_message_bytes(ApiSettings().max_upload_bytes)


def without_ws_compression() -> list:
    """Makes uvicorn servers built in this process refuse permessage-deflate and take
    WebSocket messages up to `WS_MAX_MESSAGE_BYTES` (a config that names either option
    still wins); returns no middlewares. If uvicorn no longer has
    the option, the proxy starts as before and says so: compression costs time, not
    correctness."""
    import uvicorn

    original = uvicorn.Config.__init__
    if getattr(original, "_mrt_no_deflate", False):
        return []
    if "ws_per_message_deflate" not in original.__code__.co_varnames:
        log.warning("uvicorn %s has no ws_per_message_deflate: WebSocket audio stays "
                    "deflate-compressed for clients that offer it", uvicorn.__version__)
        return []

    @functools.wraps(original)
    def init(self, *args, **kwargs):
        kwargs.setdefault("ws_per_message_deflate", False)
        kwargs.setdefault("ws_max_size", WS_MAX_MESSAGE_BYTES)
        original(self, *args, **kwargs)

    init._mrt_no_deflate = True
    uvicorn.Config.__init__ = init
    return []
