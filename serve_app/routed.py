"""A model's own Serve application: its OpenAI routes answered by the model replica itself.

Through the ingress a request takes two hops, proxy -> ingress -> model replica, and the second
is a Serve handle call over Ray: `bench/hop.py` put it at about 8.5 ms of p50 with nothing behind
it, and it capped 8 clients near 130 requests/s on 2 cores, where one hop served 471/s. That hop
was what kept this service at 1.2-1.5x a plain one-hop Serve deployment's p50 (`bench/overhead.py`).

Here the model's deployment is also the ingress of an application of its own, routed at
`/models/{id}`, so `POST /models/{id}/v1/embeddings` goes from the proxy (HAProxy straight to the
replica's HTTP port) to the replica that runs the model. Nothing else moves: the route code is the
ingress's own (the same request models, errors, key rules and body limits), and it calls the
replica's methods in-process through :class:`LocalHandle`, so every request still takes the
lifecycle's lease and reaches the router only as the lease reports it. Scaled to zero, HAProxy
has no replica to send to and hands the request to Serve's proxy (its backup server), which
starts one as for any request.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from typing import Any

from serve_app.cluster.names import ROUTE_ROOT

#: Families whose routes a model replica can answer itself (request/response routes that take
#: only the model's own handle).
ROUTED_FAMILIES = {
    "sentence-transformers": ("serve_app.api.embeddings",),
    "faster-whisper": ("serve_app.api.audio",),
}


def has_route(config: Any, model: Any) -> bool:
    """Whether `model` (of `config`, an AppConfig) has an application of its own."""
    return bool(config.http.model_routes) and model.family in ROUTED_FAMILIES


def route_prefix(app_prefix: str, model_id: str) -> str:
    return f"{app_prefix.rstrip('/')}{ROUTE_ROOT}/{model_id}"


def app_name(main_app: str, model_id: str) -> str:
    """The Serve application of a routed model, named after the service's main application."""
    from serve_app.cluster.names import deployment_name

    return f"{main_app}-{deployment_name(model_id)}"


class LocalStream:
    """A streamed method's events, iterated in-process, with the `cancel()` of Serve's response
    generator: the event being produced is cancelled, which ends the method (its `finally`
    blocks, the lease, run), or, between events, the generator is closed."""

    def __init__(self, agen: Any) -> None:
        self._agen = agen
        self._next: asyncio.Future[Any] | None = None
        self._closing: asyncio.Future[Any] | None = None

    def __aiter__(self) -> LocalStream:
        return self

    def __anext__(self) -> asyncio.Future[Any]:
        self._next = asyncio.ensure_future(self._agen.__anext__())
        return self._next

    def cancel(self) -> None:
        if self._next is not None and not self._next.done():
            self._next.cancel()
        else:
            self._closing = asyncio.ensure_future(self._agen.aclose())


class _LocalMethod:
    def __init__(self, fn: Any) -> None:
        self._fn = fn

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        out = self._fn(*args, **kwargs)
        return LocalStream(out) if inspect.isasyncgen(out) else out


class LocalHandle:
    """What a route needs of a Serve handle, for the replica that serves the route itself:
    `handle.method.remote(...)` calls the method in-process (a coroutine to await, or a
    :class:`LocalStream` to iterate), `handle.options(...)` is the same handle."""

    def __init__(self, target: Any) -> None:
        self._target = target

    def options(self, **_: Any) -> LocalHandle:
        return self

    def __getattr__(self, name: str) -> _LocalMethod:
        if name.startswith("_"):
            raise AttributeError(name)
        return _LocalMethod(getattr(self._target, name))


#: On every answer of a model's own application: which path served it (`/v1` requests for the model
#: reach it too, by HAProxy's body routes, `cluster/body_routes.py`).
SERVED_BY = (b"x-gpu-serve-served-by", b"model-route")


class ServedBy:
    """Adds `SERVED_BY` to each HTTP response."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), SERVED_BY]}
            await send(message)

        await self.app(scope, receive, send_with_header)


def build_fastapi() -> Any:
    """The model application's HTTP app: the routed families' routes behind the ingress's
    middleware. Every family's, so a request for another family's endpoint gets the ingress's
    400 naming what the model can serve, not a 404."""
    import importlib

    from fastapi import FastAPI

    from serve_app.api.auth import AuthMiddleware, context_keys
    from serve_app.api.errors import install_error_handlers
    from serve_app.api.limits import BodyLimitMiddleware, upload_limit

    app = FastAPI(title="gpu-serve model", docs_url=None, redoc_url=None)
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, limit=upload_limit)
    app.add_middleware(AuthMiddleware, keys=context_keys)
    app.add_middleware(ServedBy)
    for name in sorted({m for modules in ROUTED_FAMILIES.values() for m in modules}):
        app.include_router(importlib.import_module(name).router)
    return app


@functools.cache
def routed_class(base: type) -> type:
    """`base` (a family's replica class) as the ingress of its own application."""
    from ray import serve

    class Routed(base):  # type: ignore[misc, valid-type]
        def __init__(self, model: dict[str, Any], app: dict[str, Any]) -> None:
            super().__init__(model, app)
            from serve_app.api.context import Context, set_context
            from serve_app.cluster.router import get_or_create_router

            set_context(Context(
                config=self.app_config, handles={self.config.id: LocalHandle(self)},
                router=get_or_create_router(self.app_config), only_model=self.config.id,
            ))

        def __serve_build_asgi_app__(self) -> Any:
            return build_fastapi()

    Routed.__name__ = Routed.__qualname__ = f"Routed{base.__name__}"
    return serve.ingress()(Routed)
