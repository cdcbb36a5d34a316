"""The HTTP ingress: one FastAPI app for every surface, routed to the model deployments."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from ray import serve

from serve_app.api import admin, custom, embeddings, events, models, status_page
from serve_app.api.auth import AuthMiddleware, context_keys
from serve_app.api.context import Context, set_context
from serve_app.api.errors import install_error_handlers
from serve_app.api.limits import BodyLimitMiddleware, upload_limit
from serve_app.config import AppConfig, HttpConfig

logger = logging.getLogger("serve_app.ingress")

#: How often the ingress re-checks that every model's replica can be placed (nodes come and go).
PLACEMENT_CHECK_S = 2.0
OPTIONAL_ROUTERS = ("serve_app.api.audio", "serve_app.api.chat")
#: Realtime transcription: the OpenAI and WhisperLiveKit WebSockets, and the live page.
REALTIME_ROUTERS = ("serve_app.api.realtime", "serve_app.api.asr", "serve_app.api.live")


def build_fastapi() -> FastAPI:
    lifespans: list[Any] = []

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Mounted sub-apps' lifespans never run: the ones that need it (MCP) are entered here.
        async with contextlib.AsyncExitStack() as stack:
            for enter in lifespans:
                await stack.enter_async_context(enter())
            yield

    app = FastAPI(
        title="gpu-serve", description="OpenAI-compatible multi-model serving with managed GPU memory.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    # Every route, mounted now or later (WebSocket, /mcp), passes the key rules first (the last
    # middleware added is the outermost), then the body limits, before the route reads a byte.
    app.add_middleware(BodyLimitMiddleware, limit=upload_limit)
    app.add_middleware(AuthMiddleware, keys=context_keys)
    for module in (models, embeddings, admin, custom, events, status_page):
        app.include_router(module.router)
    lifespans.append(mount_mcp(app))
    import importlib

    for name in (*OPTIONAL_ROUTERS, *REALTIME_ROUTERS):
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        app.include_router(mod.router)
    return app


def mount_mcp(app: FastAPI) -> Any:
    """Mount the MCP tools at `/mcp`; returns the session manager's context to enter at startup."""
    from serve_app.api import mcp
    from serve_app.api.context import current_context

    ctx = current_context()
    hosts = (ctx.config.http if ctx is not None else HttpConfig()).mcp_allowed_hosts
    server = mcp.build_server(mcp.IngressBackend())
    app.mount("/mcp", mcp.streamable_app(server, tuple(hosts)))
    return server.session_manager.run


def resolve_handle(handle: Any) -> Any:
    """A bound model's handle as Serve passed it; a routed model's (`{"routed": id}`, in an
    application of its own named after this one, `serve_app/routed.py`) looked up by name.
    Not checked with the controller now: deployed from one Serve config, the applications come
    up together, and a call waits for the model's like any other."""
    if isinstance(handle, dict):
        from serve_app import routed
        from serve_app.cluster.names import deployment_name

        model_id = handle["routed"]
        app = routed.app_name(serve.get_replica_context().app_name, model_id)
        return serve.get_deployment_handle(deployment_name(model_id), app_name=app, _check_exists=False)
    return handle


@serve.deployment
@serve.ingress(build_fastapi)
class Ingress:
    def __init__(self, handles: dict[str, Any], app: dict[str, Any]) -> None:
        from serve_app.cluster.proxy import request_path, with_environment_transport
        from serve_app.cluster.router import get_or_create_router
        from serve_app.logs import configure_logging

        configure_logging()
        config = AppConfig.model_validate(app)
        router = get_or_create_router(config)
        # The models with a route of their own, `{this application's prefix}/models/{id}/v1`.
        routes = sorted(model for model, h in handles.items() if isinstance(h, dict))
        handles = with_environment_transport({model: resolve_handle(h) for model, h in handles.items()})
        path = {**request_path(handles), "model_routes": routes}
        self.context = Context(config=config, handles=handles, router=router, request_path=path)
        set_context(self.context)
        self._placement = asyncio.get_running_loop().create_task(self._watch_placement())

    async def _watch_placement(self) -> None:
        """Keep `Context.unschedulable` current: nodes join and leave, so check every few seconds."""
        from serve_app.cluster.placement import unschedulable_models

        while True:
            try:
                found = await asyncio.to_thread(unschedulable_models, self.context.config)
                for model_id in sorted(set(found) - set(self.context.unschedulable)):
                    logger.warning("model %r cannot be scheduled: %s", model_id, found[model_id])
                self.context.unschedulable = found
            except Exception as exc:  # a GCS hiccup must not stop the watch
                logger.warning("placement check failed: %s: %s", type(exc).__name__, exc)
            await asyncio.sleep(PLACEMENT_CHECK_S)
