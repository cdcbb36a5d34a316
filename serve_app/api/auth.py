"""API keys: who may call what, decided once for every route by path prefix.

Two optional key sets, from the config (`http.api_keys`, `http.admin_keys`) or the environment
(`GPU_SERVE_API_KEYS`, `GPU_SERVE_ADMIN_KEYS`, comma-separated; both sources add up):

    route                                  needs
    /health, /openapi.json, /docs, GET /   nothing (the status page's shell holds no data)
    /v1/*, /asr                            an inference or an admin key, when inference keys are set
    GET /realtime                          nothing (the live page's shell; its WebSocket carries the key)
    GET /gpu/* (status, traces)            the same: either kind
    /gpu/* commands (POST...), /gpu/events an admin key; without admin keys: loopback clients only
    /mcp, anything not listed              as /gpu/* commands (deny by default)

Rules are matched by path prefix in an ASGI middleware, not per route, so routes added later
(the realtime WebSocket, `/mcp`, `/gpu/events`) are covered the day they are mounted.
Clients send `Authorization: Bearer KEY` (what the OpenAI SDK sends); a WebSocket may pass
`?api_key=KEY` instead, because browsers cannot set headers on one; so may `/gpu/events`
(EventSource cannot set headers either). Keys are compared in
constant time, against every configured key, and never logged: a refusal logs the client
address and the path only.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import json
import logging
import os
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from serve_app.errors import error_body

logger = logging.getLogger("serve_app.api.auth")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

API_KEYS_ENV = "GPU_SERVE_API_KEYS"
ADMIN_KEYS_ENV = "GPU_SERVE_ADMIN_KEYS"
QUERY_KEY = "api_key"
#: HTTP routes a browser reaches without being able to set headers (EventSource): `?api_key=` works there.
QUERY_KEY_PATHS = frozenset({"/gpu/events"})
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class Access(str, enum.Enum):
    OPEN = "open"
    INFER = "infer"  # an inference or an admin key (when inference keys are configured)
    ADMIN = "admin"  # an admin key (without admin keys: loopback only)


#: (path prefix, methods or None for any, access), first match wins. An exact path ends with "$".
RULES: tuple[tuple[str, frozenset[str] | None, Access], ...] = (
    ("/health", None, Access.OPEN),
    ("/openapi.json$", None, Access.OPEN),
    ("/docs", READ_METHODS, Access.OPEN),
    ("/redoc", READ_METHODS, Access.OPEN),
    ("/$", READ_METHODS, Access.OPEN),
    ("/v1/", None, Access.INFER),
    ("/asr", None, Access.INFER),  # WhisperLiveKit's WebSocket: inference, like /v1/
    ("/realtime$", READ_METHODS, Access.OPEN),  # the live page's shell; its WebSocket carries the key
    ("/gpu/events", None, Access.ADMIN),
    ("/gpu/", READ_METHODS, Access.INFER),
    ("/gpu/", None, Access.ADMIN),
    ("/mcp", None, Access.ADMIN),
)


def required_access(method: str, path: str) -> Access:
    """The access a request needs; anything no rule names needs an admin key."""
    for prefix, methods, access in RULES:
        if methods is not None and method.upper() not in methods:
            continue
        if prefix.endswith("$"):
            if path == prefix[:-1]:
                return access
            continue
        base = prefix.rstrip("/")  # whole path segments only: "/healthz" is not "/health"
        if path == base or path.startswith(base + "/"):
            return access
    return Access.ADMIN


def split_keys(raw: str | None) -> tuple[str, ...]:
    """`"a, b,,c"` -> `("a", "b", "c")`."""
    return tuple(k.strip() for k in (raw or "").split(",") if k.strip())


def _digest(key: str) -> bytes:
    # Comparing fixed-length digests keeps compare_digest's time independent of key lengths too.
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True)
class KeySet:
    """Configured keys, held as digests only."""

    api: tuple[bytes, ...] = ()
    admin: tuple[bytes, ...] = ()

    @classmethod
    def from_keys(cls, api: Iterable[str] = (), admin: Iterable[str] = ()) -> KeySet:
        def digests(keys: Iterable[str]) -> tuple[bytes, ...]:
            return tuple(_digest(k) for k in dict.fromkeys(keys) if k)

        return cls(digests(api), digests(admin))

    @classmethod
    def from_config(cls, http: Any, environ: MutableMapping[str, str] | None = None) -> KeySet:
        env = os.environ if environ is None else environ
        api = [*getattr(http, "api_keys", ()), *split_keys(env.get(API_KEYS_ENV))]
        admin = [*getattr(http, "admin_keys", ()), *split_keys(env.get(ADMIN_KEYS_ENV))]
        return cls.from_keys(api, admin)

    @staticmethod
    def _matches(key: str, digests: tuple[bytes, ...]) -> bool:
        d = _digest(key)
        found = False
        for known in digests:  # no early exit: the time does not tell which key matched
            found |= hmac.compare_digest(d, known)
        return found

    def kind(self, key: str | None) -> str | None:
        """"admin", "api", or None for no key or an unknown one."""
        if not key:
            return None
        is_admin = self._matches(key, self.admin)
        is_api = self._matches(key, self.api)
        return "admin" if is_admin else "api" if is_api else None


@dataclass(frozen=True)
class Decision:
    allowed: bool
    status: int = 200
    message: str = ""
    code: str | None = None


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return host == "localhost"


def decide(keys: KeySet, access: Access, key: str | None, client_host: str | None) -> Decision:
    """Who may do what: a pure function of the configured keys, the route and the caller."""
    if access is Access.OPEN:
        return Decision(True)
    kind = keys.kind(key)
    if access is Access.INFER:
        if not keys.api:
            return Decision(True)
        if kind is not None:
            return Decision(True)
        return _unauthorized(key)
    # Admin.
    if keys.admin:
        if kind == "admin":
            return Decision(True)
        if kind == "api":
            return Decision(
                False, 403,
                "this key is an inference key and cannot run admin commands; use a key from "
                f"{ADMIN_KEYS_ENV} (or http.admin_keys)",
                "insufficient_permissions",
            )
        return _unauthorized(key, admin=True)
    if is_loopback(client_host):
        return Decision(True)
    return Decision(
        False, 403,
        f"admin commands are accepted only from loopback (127.0.0.1, ::1) when no admin keys are set, "
        f"and this request came from {client_host or 'an unknown address'}; set {ADMIN_KEYS_ENV} "
        "(or http.admin_keys) to allow remote admin with Authorization: Bearer KEY",
        "admin_loopback_only",
    )


def _unauthorized(key: str | None, *, admin: bool = False) -> Decision:
    kind = "an admin key" if admin else "an API key"
    env = ADMIN_KEYS_ENV if admin else f"{API_KEYS_ENV} or {ADMIN_KEYS_ENV}"
    if key:
        return Decision(
            False, 401, f"Incorrect API key provided. This endpoint needs {kind} (one listed in {env}).",
            "invalid_api_key",
        )
    return Decision(
        False, 401,
        f"You didn't provide an API key. This endpoint needs {kind}: send it as Authorization: Bearer KEY.",
        "missing_api_key",
    )


def request_key(scope: Scope) -> str | None:
    """The Bearer token; for a WebSocket and the event stream also the `api_key` query parameter."""
    for name, value in scope.get("headers") or ():
        if name.lower() == b"authorization":
            text = value.decode("latin-1").strip()
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return text or None
    if scope["type"] == "websocket" or route_path(scope) in QUERY_KEY_PATHS:
        values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get(QUERY_KEY)
        if values:
            return values[0]
    return None


_cached: tuple[Any, KeySet] | None = None


def route_path(scope: Scope) -> str:
    """The path below the application's route prefix: a model's own application
    (`/models/{id}`, `serve_app/routed.py`) sees `/v1/embeddings` as the ingress does."""
    path = scope.get("path", "/")
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root):] or "/"
    return path


def context_keys() -> KeySet:
    """The ingress's key set, computed once per context (config plus environment)."""
    global _cached
    from serve_app.api.context import get_context

    ctx = get_context()
    if _cached is None or _cached[0] is not ctx:
        _cached = (ctx, KeySet.from_config(ctx.config.http))
    return _cached[1]


class AuthMiddleware:
    """Applies `decide` to every HTTP request and WebSocket before any route runs.

    `keys` is called per request (it is cheap: the ingress caches its KeySet), so the key
    set can be supplied after the app is built, which is how the Serve ingress works.
    """

    def __init__(self, app: ASGIApp, keys: Callable[[], KeySet]) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        method = scope.get("method", "GET") if scope["type"] == "http" else "GET"
        path = route_path(scope)
        client = scope.get("client")
        host = client[0] if client else None
        decision = decide(self.keys(), required_access(method, path), request_key(scope), host)
        if decision.allowed:
            await self.app(scope, receive, send)
            return
        # One line, no key material: the address and the route are what an operator needs.
        logger.warning("refused %s %s from %s: %d %s", method, path, host, decision.status, decision.code)
        body = json.dumps(error_body(decision.message, "invalid_request_error", None, decision.code)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if decision.status == 401:
            headers.append((b"www-authenticate", b'Bearer realm="gpu-serve"'))
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": decision.status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        elif "websocket.http.response" in (scope.get("extensions") or {}):
            await send({"type": "websocket.http.response.start", "status": decision.status, "headers": headers})
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            await send({"type": "websocket.close", "code": 1008, "reason": decision.message[:120]})
