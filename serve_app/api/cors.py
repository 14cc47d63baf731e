"""Starlette's CORS, with a refused preflight answered as every other error is.

A browser does not show a preflight's answer to the page, but whoever sets up a web app
against this server tries its preflight by hand (curl) to see why the browser refuses:
Starlette says "Disallowed CORS origin, method" in plain text; this says which origin
or method, and where the list of origins is set.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response

from ..errors import clipped

_REFUSED = "Disallowed CORS "


class CORSWithNamedErrors(CORSMiddleware):
    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        text = bytes(response.body).decode()
        if response.status_code != 400 or not text.startswith(_REFUSED):
            return response
        reasons = {
            "origin": f"origin: {clipped(request_headers['origin'])} is not in "
                      "api.cors_origins (MRT_CORS_ORIGINS)",
            "method": "access-control-request-method: "
                      f"{clipped(request_headers['access-control-request-method'])} is not "
                      "an HTTP method",
            "headers": "access-control-request-headers: not all allowed",
            "private-network": "access-control-request-private-network: not allowed",
        }
        refused = text.removeprefix(_REFUSED).split(", ")
        headers = {k: v for k, v in response.headers.items()
                   if k not in ("content-length", "content-type")}
        return JSONResponse({"error": "; ".join(reasons.get(r, r) for r in refused)},
                            status_code=400, headers=headers)
