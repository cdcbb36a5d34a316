"""Exception handlers that turn every failure into OpenAI's error shape."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app.errors import QueueFull, ReplicaUnavailable, ServeError, error_body

logger = logging.getLogger("serve_app.api")


#: Ray's errors for an actor that died or cannot be reached (matched by name: no Ray import here).
REPLICA_GONE = frozenset({"RayActorError", "ActorDiedError", "ActorUnavailableError"})


def unwrap(exc: BaseException) -> BaseException:
    """Return the replica's own exception from a Ray task error (it crosses processes wrapped)."""
    cause = getattr(exc, "cause", None)
    while cause is not None and cause is not exc:
        exc, cause = cause, getattr(cause, "cause", None)
    return exc


def error_response(exc: BaseException) -> JSONResponse:
    exc = unwrap(exc)
    if type(exc).__name__ == "BackPressureError":  # Serve's bounded queue for a model is full
        exc = QueueFull(
            f"too many requests are waiting for this model ({exc}); retry shortly", retry_after_s=2.0
        )
    if type(exc).__name__ in REPLICA_GONE:  # killed or crashed mid-request: retryable, not our bug
        first_line = (str(exc).splitlines() or [""])[0][:200]
        logger.warning("model replica lost mid-request: %s: %s", type(exc).__name__, first_line)
        exc = ReplicaUnavailable(type(exc).__name__)
    if isinstance(exc, ServeError):
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers())
    logger.exception("unhandled error", exc_info=exc)
    return JSONResponse(
        error_body(f"internal error: {type(exc).__name__}: {exc}", "internal_error"), status_code=500
    )


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first error as `where: what (got value)`, with OpenAI's `param` the top-level field."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    raw_loc = list(first.get("loc", ()))
    if first.get("type") == "json_invalid":
        return f"malformed JSON body: {first.get('msg')}; send a JSON object", None
    loc = [str(p) for p in (raw_loc[1:] if raw_loc[:1] == ["body"] else raw_loc)]
    param = loc[0] if loc else None
    where = ".".join(loc) or "body"
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    got = first.get("input")
    shown = repr(got)
    detail = "" if first.get("type") == "missing" or len(shown) > 80 else f" (got {shown})"
    if not loc and not isinstance(got, dict):
        msg = f"{msg}; the request body must be a JSON object"
    return f"{where}: {msg}{detail}", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServeError)
    async def _serve_error(_: Request, exc: ServeError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(
            error_body(str(exc.detail), kind), status_code=exc.status_code, headers=getattr(exc, "headers", None)
        )

    @app.exception_handler(Exception)
    async def _any(_: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)
