"""Errors that reach clients: each carries its HTTP status and a message naming the cause.

They cross Ray boundaries intact (Ray re-raises a remote exception as a subclass
of its own type), so the ingress maps them to responses without knowing where
they were raised.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping
from typing import Annotated, Any

from pydantic import BeforeValidator, ValidationError, ValidatorFunctionWrapHandler, WrapValidator
from pydantic_core import PydanticCustomError

# a JSON text nested deeper than the parser goes ('[' * 100000): json.loads raises
# RecursionError, which no JSON check expects
TOO_DEEP = "not valid JSON (nested too deeply)"


class ApiError(Exception):
    status = 500

    def __init__(self, message: str, *, replica: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        # The generator replica that refused, when another replica might not: a new
        # session refused for capacity or readiness is tried elsewhere by the ingress.
        self.replica = replica

    def reworded(self, message: str) -> ApiError:
        """This error (same status) with another message. Of its own class here: one
        raised remotely arrives as a subclass Ray makes (`RayTaskError(OverCapacity)`),
        which cannot be built from a message."""
        own = next(k for k in type(self).__mro__ if k.__module__ == __name__)
        return own(message, replica=self.replica)


class BadRequest(ApiError):
    status = 400


class Unauthorized(ApiError):
    status = 401


class Forbidden(ApiError):
    status = 403


class UnknownSession(ApiError):
    status = 404


class SessionLost(UnknownSession):
    """The session's generator replica is gone (scaled down, crashed): a WebSocket jam
    moves to another replica (`serve_app/api/resume.py`); a polled jam must start anew,
    as the message's last words (`ADVICE`) tell it."""

    ADVICE = "; start a new session"

    @property
    def reason(self) -> str:
        """What happened, without the advice: a moved stream's client needs no new session."""
        return self.message.removesuffix(self.ADVICE)


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
        loc, kind = tuple(err["loc"]), err.get("type")
        if kind == "json_invalid":  # FastAPI's loc is ("body", <character position>)
            detail = (err.get("ctx") or {}).get("error", err["msg"])
            problems.append(f"{loc[0]}: not valid JSON ({detail} at character {loc[-1]})")
            continue
        field = ".".join(str(p) for p in loc if p not in skip)
        if not field and loc and kind != "value_error":
            field = str(loc[0])  # the whole body is wrong (a list for an object, say)
        reason = err["msg"].removeprefix("Value error, ")
        problems.append(f"{field}: {reason}" if field else reason)
    return problems


def clipped(text: str, limit: int = 80) -> str:
    """Client text as an error quotes it: whole up to `limit` characters, else its start and
    its length (a 5000-character session id came back whole in every answer)."""
    return text if len(text) <= limit else f"{text[:limit - 3]}... ({len(text)} characters)"


def shown(value: Any, limit: int = 60) -> str:
    """A value a client sent, as an error shows it: its repr, clipped."""
    return clipped(repr(value), limit)


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"must be a number, got {str(value).lower()}")
    return value


# JSON numbers that refuse true and false, which pydantic's lax mode reads as 1 and 0
# (`topk: true` was top-k 1, `notes: [true]` pitch 1); strings of digits still pass.
Int = Annotated[int, BeforeValidator(_not_bool)]
Float = Annotated[float, BeforeValidator(_not_bool)]


def either(hint: Any, expected: str) -> Any:
    """`hint` (a union of a string form and a JSON form) answering a bad value with one
    reason, `expected`, instead of pydantic's reason per member ("drums.bool: ...;
    drums.literal['free','on','off']: ...")."""

    def check(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("either", "must be {expected}, got {shown}",
                                      {"expected": expected, "shown": shown(value)}) from None

    return Annotated[hint, WrapValidator(check)]
