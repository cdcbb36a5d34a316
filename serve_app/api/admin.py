"""The admin API: see and steer GPU memory (`/gpu/*`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serve_app.api.context import Context, get_context
from serve_app.api.errors import invalid_from_validation, json_body, unwrap
from serve_app.errors import InvalidRequest, RouterUnavailable

router = APIRouter(prefix="/gpu")


class ModelCommand(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None


class TimeoutCommand(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    idle_timeout_s: float | None = Field(None, ge=0)
    release_timeout_s: float | None = Field(None, gt=0)


def _parse(cls: type[BaseModel], body: Any) -> Any:
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    try:
        return cls.model_validate(body)
    except ValidationError as exc:
        raise invalid_from_validation(exc) from None


async def _body(request: Request) -> Any:
    raw = await request.body()
    return await json_body(request) if raw.strip() else {}


async def call_router(ctx: Context, method: str, *args: Any) -> Any:
    """Call the router actor; while it restarts, answer 503 with Retry-After instead of 500."""
    from ray.exceptions import RayActorError

    if ctx.router is None:
        raise RouterUnavailable("no router handle")
    try:
        return await getattr(ctx.router, method).remote(*args)
    except RayActorError as exc:
        raise RouterUnavailable(type(exc).__name__) from None


@router.get("/status")
async def gpu_status(ctx: Context = Depends(get_context)) -> dict[str, Any]:
    return await call_router(ctx, "status")


async def _command(ctx: Context, kind: str, model: str | None, params: dict[str, Any] | None = None) -> dict[str, Any]:
    if model is not None:
        ctx.model(model)
    results = await call_router(ctx, "command", kind, model, params)
    return {"action": kind, "model": model, "instances": results}


@router.post("/offload")
async def offload(request: Request, ctx: Context = Depends(get_context)) -> dict[str, Any]:
    cmd = _parse(ModelCommand, await _body(request))
    return await _command(ctx, "offload", cmd.model)


@router.post("/release")
async def release(request: Request, ctx: Context = Depends(get_context)) -> dict[str, Any]:
    cmd = _parse(ModelCommand, await _body(request))
    return await _command(ctx, "release", cmd.model)


@router.post("/load")
async def load(request: Request, ctx: Context = Depends(get_context)) -> dict[str, Any]:
    """Preheat every replica of the model; with none (scaled to zero), ask Serve for one."""
    cmd = _parse(ModelCommand, await _body(request))
    if cmd.model is None:
        raise InvalidRequest("model is required for /gpu/load", param="model")
    ctx.model(cmd.model)
    result = await _command(ctx, "load", cmd.model)
    if result["instances"]:
        return result
    try:
        status = await ctx.handles[cmd.model].preheat.remote()
    except Exception as exc:
        raise unwrap(exc) from None
    return {
        "action": "load",
        "model": cmd.model,
        "instances": [
            {"model": cmd.model, "replica": status["replica"], "outcome": "loaded", "state": status["state"]}
        ],
    }


@router.post("/timeout")
async def set_timeout(request: Request, ctx: Context = Depends(get_context)) -> dict[str, Any]:
    cmd = _parse(TimeoutCommand, await _body(request))
    params = cmd.model_dump(exclude_none=True, exclude={"model"})
    if not params:
        raise InvalidRequest("give idle_timeout_s and/or release_timeout_s", param="idle_timeout_s")
    result = await _command(ctx, "policy", cmd.model, params)
    result["policy"] = params
    return result


