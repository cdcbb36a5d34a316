"""The admin API: see and steer GPU memory (`/gpu/*`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from serve_app.api.context import Context, get_context
from serve_app.api.errors import unwrap
from serve_app.errors import InvalidRequest, RouterUnavailable

router = APIRouter(prefix="/gpu")


class ModelCommand(BaseModel):
    """An admin command's target; every model when `model` is absent (where the command allows)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, description="A configured model id; absent: every model.")


class TimeoutCommand(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    idle_timeout_s: float | None = Field(None, ge=0)
    release_timeout_s: float | None = Field(None, gt=0)


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
    doc = await call_router(ctx, "status")
    for row in doc.get("models", ()):
        if row.get("model") in ctx.unschedulable and not row.get("replica"):
            row["state"], row["reason"] = "unschedulable", ctx.unschedulable[row["model"]]
    doc["unschedulable"] = dict(ctx.unschedulable)
    return doc


@router.get("/trace", response_class=PlainTextResponse)
async def gpu_trace(ctx: Context = Depends(get_context)) -> PlainTextResponse:
    """The router's recorded requests as the simulator's trace CSV (`time_s,model,bytes,duration_s`):
    replay them with `bench/policy_sim.py --trace` against other timeouts and budgets."""
    body = await call_router(ctx, "trace_csv")
    return PlainTextResponse(body, media_type="text/csv")


@router.get("/trace/models", response_class=PlainTextResponse)
async def gpu_trace_models(ctx: Context = Depends(get_context)) -> PlainTextResponse:
    """The models seen in the trace with their sizes and measured load and restore seconds
    (`model,bytes,cold_load_s,restore_s`): the simulator's `--models` file."""
    body = await call_router(ctx, "trace_models_csv")
    return PlainTextResponse(body, media_type="text/csv")


async def _command(ctx: Context, kind: str, model: str | None, params: dict[str, Any] | None = None) -> dict[str, Any]:
    if model is not None:
        ctx.model(model)
    results = await call_router(ctx, "command", kind, model, params)
    return {"action": kind, "model": model, "instances": results}


@router.post("/offload")
async def offload(cmd: ModelCommand | None = Body(None), ctx: Context = Depends(get_context)) -> dict[str, Any]:
    cmd = cmd or ModelCommand()
    return await _command(ctx, "offload", cmd.model)


@router.post("/release")
async def release(cmd: ModelCommand | None = Body(None), ctx: Context = Depends(get_context)) -> dict[str, Any]:
    cmd = cmd or ModelCommand()
    return await _command(ctx, "release", cmd.model)


@router.post("/load")
async def load(cmd: ModelCommand | None = Body(None), ctx: Context = Depends(get_context)) -> dict[str, Any]:
    """Preheat every replica of the model; with none (scaled to zero), ask Serve for one."""
    cmd = cmd or ModelCommand()
    if cmd.model is None:
        raise InvalidRequest("model is required for /gpu/load", param="model")
    ctx.model(cmd.model)
    ctx.require_schedulable(cmd.model)  # else Serve would wait for a replica forever
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
async def set_timeout(cmd: TimeoutCommand | None = Body(None), ctx: Context = Depends(get_context)) -> dict[str, Any]:
    cmd = cmd or TimeoutCommand()
    params = cmd.model_dump(exclude_none=True, exclude={"model"})
    if not params:
        raise InvalidRequest("give idle_timeout_s and/or release_timeout_s", param="idle_timeout_s")
    result = await _command(ctx, "policy", cmd.model, params)
    result["policy"] = params
    return result


