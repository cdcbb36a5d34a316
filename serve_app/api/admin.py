"""The admin API: see and steer GPU memory (`/gpu/*`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from serve_app.api import operations
from serve_app.api.context import Context, request_context

router = APIRouter(prefix="/gpu")
#: The logic lives in `operations` (shared with MCP and the status page); the old names stay.
call_router = operations.call_router
_command = operations.command


class ModelCommand(BaseModel):
    """An admin command's target; every model when `model` is absent (where the command allows)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, description="A configured model id; absent: every model.")


class TimeoutCommand(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    idle_timeout_s: float | None = Field(None, ge=0)
    release_timeout_s: float | None = Field(None, gt=0)


@router.get("/status")
async def gpu_status(ctx: Context = Depends(request_context)) -> dict[str, Any]:
    return await operations.gpu_status(ctx)


@router.get("/trace", response_class=PlainTextResponse)
async def gpu_trace(ctx: Context = Depends(request_context)) -> PlainTextResponse:
    """The router's recorded requests as the simulator's trace CSV (`time_s,model,bytes,duration_s`):
    replay them with `bench/policy_sim.py --trace` against other timeouts and budgets."""
    body = await call_router(ctx, "trace_csv")
    return PlainTextResponse(body, media_type="text/csv")


@router.get("/trace/models", response_class=PlainTextResponse)
async def gpu_trace_models(ctx: Context = Depends(request_context)) -> PlainTextResponse:
    """The models seen in the trace with their sizes and measured load and restore seconds
    (`model,bytes,cold_load_s,restore_s`): the simulator's `--models` file."""
    body = await call_router(ctx, "trace_models_csv")
    return PlainTextResponse(body, media_type="text/csv")


@router.post("/offload")
async def offload(cmd: ModelCommand | None = Body(None), ctx: Context = Depends(request_context)) -> dict[str, Any]:
    cmd = cmd or ModelCommand()
    return await operations.offload(ctx, cmd.model)


@router.post("/release")
async def release(cmd: ModelCommand | None = Body(None), ctx: Context = Depends(request_context)) -> dict[str, Any]:
    cmd = cmd or ModelCommand()
    return await operations.release(ctx, cmd.model)


@router.post("/load")
async def load(cmd: ModelCommand | None = Body(None), ctx: Context = Depends(request_context)) -> dict[str, Any]:
    """Preheat every replica of the model; with none (scaled to zero), ask Serve for one."""
    cmd = cmd or ModelCommand()
    return await operations.load(ctx, cmd.model)


@router.post("/timeout")
async def set_timeout(
    cmd: TimeoutCommand | None = Body(None), ctx: Context = Depends(request_context)
) -> dict[str, Any]:
    cmd = cmd or TimeoutCommand()
    return await operations.set_timeouts(ctx, cmd.model, cmd.idle_timeout_s, cmd.release_timeout_s)
