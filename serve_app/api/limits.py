"""Request bodies: size and content type, checked before a route reads anything.

* 413 when a body is larger than `http.max_upload_bytes` (25 MiB by default, OpenAI's limit)
  plus room for multipart framing: refused on the declared Content-Length before a byte is
  read, and while a chunked body streams in, as soon as it passes the limit. The body is never
  buffered past the limit.
* 415 when a route that takes JSON gets another content type, or the audio routes get
  something other than multipart/form-data. Routes not listed (`/mcp`, ...) choose their own.

Like the key rules (`auth.py`), this is one ASGI middleware matched by path prefix, so routes
mounted later get the size limit without a line of their own.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from serve_app.api.auth import ASGIApp, Message, Receive, Scope, Send, route_path
from serve_app.errors import PayloadTooLarge, error_body

#: Room for the multipart boundaries and the small fields next to an upload.
FORM_OVERHEAD_BYTES = 64 * 1024
MiB = 1024**2
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})

#: (path prefix, accepted media types); first match wins; "" in the set: no content type is fine.
CONTENT_TYPES: tuple[tuple[str, frozenset[str]], ...] = (
    ("/v1/audio/", frozenset({"multipart/form-data"})),
    ("/v1/", frozenset({"application/json", ""})),
    ("/gpu/", frozenset({"application/json", ""})),
)


def upload_limit() -> int:
    """The context's `http.max_upload_bytes`, read per request (the context is set after the app is built)."""
    from serve_app.api.context import get_context

    return get_context().config.http.max_upload_bytes


def accepted_types(path: str) -> frozenset[str] | None:
    for prefix, types in CONTENT_TYPES:
        if path.startswith(prefix):
            return types
    return None


def media_type(headers: list[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name.lower() == b"content-type":
            return value.decode("latin-1").split(";", 1)[0].strip().lower()
    return ""


def _is_accepted(media: str, types: frozenset[str]) -> bool:
    if media in types:
        return True
    return "application/json" in types and media.startswith("application/") and media.endswith("+json")


class _TooLarge(PayloadTooLarge):
    """Raised from `receive` once a streaming body passes the limit."""


def too_large(size: int, limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"the request body is at least {size / MiB:.1f} MiB, more than the limit of {limit / MiB:.1f} MiB "
        "(http.max_upload_bytes); compress the audio (mp3, ogg, flac) or split it into shorter files",
        param="file",
    )


class BodyLimitMiddleware:
    """413 and 415 before the route runs. `limit` is called per request (the ingress's config)."""

    def __init__(self, app: ASGIApp, limit: Callable[[], int]) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method", "GET") not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        headers = list(scope.get("headers") or ())
        limit = self.limit()
        cap = limit + FORM_OVERHEAD_BYTES
        declared = next((v for k, v in headers if k.lower() == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > cap:
            await _answer(send, too_large(int(declared), limit))
            return
        types = accepted_types(route_path(scope))
        media = media_type(headers)
        has_body = declared is None or declared not in (b"0", b"")
        if types is not None and has_body and not _is_accepted(media, types):
            wanted = " or ".join(sorted(t for t in types if t)) or "no body"
            message = (
                f"unsupported content type {media or '(none)'!r} for {scope.get('path')}; send {wanted}"
                + ("" if "" not in types else " (or no Content-Type header)")
            )
            await _answer(send, 415, message, "unsupported_media_type")
            return

        received = 0
        refused = False
        started = False

        async def capped_receive() -> Message:
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > cap:
                    refused = True
                    raise _TooLarge(too_large(received, limit).message, param="file")
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:  # whatever the route made of the exception, the answer is 413
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await _answer(send, too_large(received, limit))
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, capped_receive, guarded_send)
        except _TooLarge:
            if not started:
                started = True
                await _answer(send, too_large(received, limit))


async def _answer(send: Send, status_or_error: Any, message: str = "", code: str | None = None) -> None:
    if isinstance(status_or_error, PayloadTooLarge):
        status, body = 413, status_or_error.body()
    else:
        status, body = int(status_or_error), error_body(message, "invalid_request_error", None, code)
    raw = json.dumps(body).encode()
    await send({
        "type": "http.response.start", "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode()),
                    (b"connection", b"close")],
    })
    await send({"type": "http.response.body", "body": raw})
