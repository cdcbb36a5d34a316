"""The admin API: see and steer GPU memory (`/gpu/*`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends
from pydantic import BaseModel, ConfigDict, Field

from serve_app.api import operations
from serve_app.api.context import Context, get_context

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
async def gpu_status(ctx: Context = Depends(get_context)) -> dict[str, Any]:
    return await operations.gpu_status(ctx)


@router.post("/offload")
async def offload(cmd: ModelCommand | None = Body(None), ctx: Context = Depends(get_context)) -> dict[str, Any]:
    cmd = cmd or ModelCommand()
    return await operations.offload(ctx, cmd.model)


@router.post("/release")
async def release(cmd: ModelCommand | None = Body(None), ctx: Context = Depends(get_context)) -> dict[str, Any]:
    cmd = cmd or ModelCommand()
    return await operations.release(ctx, cmd.model)


@router.post("/load")
async def load(cmd: ModelCommand | None = Body(None), ctx: Context = Depends(get_context)) -> dict[str, Any]:
    """Preheat every replica of the model; with none (scaled to zero), ask Serve for one."""
    cmd = cmd or ModelCommand()
    return await operations.load(ctx, cmd.model)


@router.post("/timeout")
async def set_timeout(cmd: TimeoutCommand | None = Body(None), ctx: Context = Depends(get_context)) -> dict[str, Any]:
    cmd = cmd or TimeoutCommand()
    return await operations.set_timeouts(ctx, cmd.model, cmd.idle_timeout_s, cmd.release_timeout_s)
