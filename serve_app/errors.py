"""Errors that reach clients: each carries its HTTP status and a message naming the cause.

They cross Ray boundaries intact (Ray re-raises a remote exception as a subclass
of its own type), so the ingress maps them to responses without knowing where
they were raised.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping


class ApiError(Exception):
    status = 500

    def __init__(self, message: str, *, replica: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        # The generator replica that refused, when another replica might not: a new
        # session refused for capacity or readiness is tried elsewhere by the ingress.
        self.replica = replica


class BadRequest(ApiError):
    status = 400


class Unauthorized(ApiError):
    status = 401


class Forbidden(ApiError):
    status = 403


class UnknownSession(ApiError):
    status = 404


class NotReady(ApiError):
    """Timed out waiting (HTTP 408, as the prototype's /jam/next)."""

    status = 408


class PayloadTooLarge(ApiError):
    status = 413


class OverCapacity(ApiError):
    status = 429


class Unavailable(ApiError):
    status = 503


class Conflict(ApiError):
    """The request cannot be done in the server's current state (HTTP 409)."""

    status = 409


def field_problems(errors: Iterable[Mapping], *, skip: Container[str] = ()) -> list[str]:
    """"field: reason" for each of pydantic's validation errors, the form every bad input
    is answered in (HTTP forms and bodies, WebSocket params, config files). `skip` drops
    location parts that name no field of the client's (FastAPI's "body", "query", "form").
    Our own validators' reasons lose pydantic's "Value error, " prefix, and a whole-model
    validator's (no field to name) is its reason alone: it names its fields itself."""
    problems = []
    for err in errors:
        field = ".".join(str(p) for p in err["loc"] if p not in skip)
        reason = err["msg"].removeprefix("Value error, ")
        problems.append(f"{field}: {reason}" if field else reason)
    return problems
