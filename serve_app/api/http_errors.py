"""Every error answer in one shape: `{"error": "<field>: <reason>", ...}`.

Our own errors (`ApiError`) and pydantic's already are. What Starlette and FastAPI
answer themselves, before a route runs, was `{"detail": "Not Found"}` or
`{"detail": "There was an error parsing the body"}`: no `error` for a client to
show and no field. Those keep their `detail` (older clients may read it) and gain
the `error` that names what was wrong.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from ..errors import TOO_DEEP, ApiError, field_problems

# FastAPI's answer when reading the body raised anything but a JSON decode error
_UNPARSED_BODY = "There was an error parsing the body"


def framework_problem(exc: HTTPException, request: Request) -> tuple[int, str]:
    """The status and "field: reason" of an error Starlette or FastAPI raised before our
    code ran."""
    if exc.status_code == 404:
        return 404, f"path: {request.url.path} is not a route of this server (see /docs)"
    if exc.status_code == 405:
        allowed = Headers(headers=exc.headers or {}).get("allow")
        also = f" (it takes {allowed})" if allowed else ""
        return 405, f"method: {request.method} is not allowed on {request.url.path}{also}"
    if exc.detail == _UNPARSED_BODY:
        cause = exc.__cause__
        # '[' * 100000: invalid JSON, answered as FastAPI answers the rest of it (422)
        if isinstance(cause, RecursionError):
            return 422, f"body: {TOO_DEEP}"
        return exc.status_code, f"body: could not be read ({cause or 'unreadable'})"
    if exc.status_code == 400:  # Starlette's multipart parser: "Missing boundary in multipart."
        return 400, f"body: {str(exc.detail).rstrip('.')}"
    return exc.status_code, str(exc.detail)


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = field_problems(exc.errors(), skip=("body", "query", "form"))
        detail = [{k: err[k] for k in ("loc", "msg", "type")} for err in exc.errors()]
        return JSONResponse({"error": "; ".join(problems), "detail": detail}, status_code=422)

    @app.exception_handler(HTTPException)
    async def framework_error(request: Request, exc: HTTPException) -> JSONResponse:
        status, problem = framework_problem(exc, request)
        return JSONResponse({"error": problem, "detail": exc.detail},
                            status_code=status, headers=exc.headers)
