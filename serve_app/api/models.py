"""GET /v1/models and GET /health."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Depends

from serve_app.api.context import Context, request_context
from serve_app.errors import ModelNotFound

router = APIRouter()
_STARTED = int(time.time())


def _model_card(m: Any) -> dict[str, Any]:
    return {"id": m.id, "object": "model", "created": _STARTED, "owned_by": "gpu-serve", "family": m.family}


@router.get("/v1/models")
async def list_models(ctx: Context = Depends(request_context)) -> dict[str, Any]:
    return {"object": "list", "data": [_model_card(m) for m in ctx.config.models]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, ctx: Context = Depends(request_context)) -> dict[str, Any]:
    m = ctx.config.model(model_id)
    if m is None:
        raise ModelNotFound(model_id, [x.id for x in ctx.config.models])
    return _model_card(m)


@router.get("/health")
async def health(ctx: Context = Depends(request_context)) -> dict[str, Any]:
    """Answers as soon as the ingress is up, with nothing loaded; adds the router's view."""
    summary: dict[str, Any] = {m.id: "unloaded" for m in ctx.config.models}
    router_ok = False
    if ctx.router is not None:
        try:
            status = await asyncio.wait_for(_await(ctx.router.status.remote()), timeout=2.0)
            router_ok = True
            per_model: dict[str, list[str]] = {}
            for inst in status["models"]:
                per_model.setdefault(inst["model"], []).append(inst["state"])
            summary = {m: _summarise(states) for m, states in per_model.items()}
        except Exception:
            router_ok = False
    for model_id in ctx.unschedulable:
        summary[model_id] = "unschedulable"
    return {
        "status": "ok", "router": "reachable" if router_ok else "unreachable", "models": summary,
        "unschedulable": dict(ctx.unschedulable),
    }


async def _await(ref: Any) -> Any:
    return await ref


def _summarise(states: list[str]) -> str:
    for preferred in ("gpu", "restoring", "loading", "offloading", "cpu", "releasing"):
        if preferred in states:
            return preferred
    return "unloaded"
