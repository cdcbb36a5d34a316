"""The HTTP ingress: one FastAPI app for every surface, routed to the model deployments."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI
from ray import serve

from serve_app.api import admin, embeddings, models
from serve_app.api.auth import AuthMiddleware, context_keys
from serve_app.api.context import Context, get_context, set_context
from serve_app.api.errors import install_error_handlers
from serve_app.api.limits import BodyLimitMiddleware
from serve_app.config import AppConfig

logger = logging.getLogger("serve_app.ingress")

OPTIONAL_ROUTERS = ("serve_app.api.audio", "serve_app.api.chat")


def upload_limit() -> int:
    return get_context().config.http.max_upload_bytes


def build_fastapi() -> FastAPI:
    app = FastAPI(title="gpu-serve", description="OpenAI-compatible multi-model serving with managed GPU memory.")
    install_error_handlers(app)
    # Every route, mounted now or later (WebSocket, /mcp), passes the key rules first (the last
    # middleware added is the outermost), then the body limits, before the route reads a byte.
    app.add_middleware(BodyLimitMiddleware, limit=upload_limit)
    app.add_middleware(AuthMiddleware, keys=context_keys)
    for module in (models, embeddings, admin):
        app.include_router(module.router)
    import importlib

    for name in OPTIONAL_ROUTERS:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        app.include_router(mod.router)
    return app


@serve.deployment
@serve.ingress(build_fastapi)
class Ingress:
    def __init__(self, handles: dict[str, Any], app: dict[str, Any]) -> None:
        from serve_app.cluster.router import get_or_create_router
        from serve_app.logs import configure_logging

        configure_logging()
        config = AppConfig.model_validate(app)
        router = get_or_create_router(config)
        set_context(Context(config=config, handles=handles, router=router))
