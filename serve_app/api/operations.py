"""The admin logic every operator surface shares: `/gpu/*`, the MCP tools and the status page.

Each function takes the ingress `Context` and plain arguments and returns plain data, raising
the service's errors (`serve_app.errors`) for a bad request; the HTTP layer turns those into
OpenAI-shaped responses and the MCP layer into tool errors, so the surfaces always agree.
"""

from __future__ import annotations

import math
from typing import Any

from serve_app.api.context import Context
from serve_app.api.errors import unwrap
from serve_app.core.progress import estimate
from serve_app.errors import InvalidRequest, RouterUnavailable


async def call_router(ctx: Context, method: str, *args: Any) -> Any:
    """Call the router actor; while it restarts, answer 503 with Retry-After instead of 500."""
    from ray.exceptions import RayActorError

    if ctx.router is None:
        raise RouterUnavailable("no router handle")
    try:
        return await getattr(ctx.router, method).remote(*args)
    except RayActorError as exc:
        raise RouterUnavailable(type(exc).__name__) from None


async def gpu_status(ctx: Context) -> dict[str, Any]:
    """The `/gpu/status` document, with the ingress's placement view and a progress estimate
    on every model row whose load or restore is in flight."""
    doc = await call_router(ctx, "status")
    rows = doc.get("models", ())
    for row in rows:
        if row.get("model") in ctx.unschedulable and not row.get("replica"):
            row["state"], row["reason"] = "unschedulable", ctx.unschedulable[row["model"]]
        cfg = ctx.config.model(row.get("model") or "")
        row["progress"] = estimate(row, rows, cfg.vram_bytes if cfg is not None else None)
    doc["unschedulable"] = dict(ctx.unschedulable)
    doc["request_path"] = dict(ctx.request_path)
    return doc


def list_models(ctx: Context) -> list[dict[str, Any]]:
    """Every configured model with the knobs an operator reads before acting."""
    return [
        {
            "id": m.id, "family": m.family, "num_gpus": m.num_gpus, "priority": m.priority, "pinned": m.pinned,
            "idle_timeout_s": m.idle_timeout_s, "release_timeout_s": m.release_timeout_s,
            "vram_bytes": m.vram_bytes,
        }
        for m in ctx.config.models
    ]


async def command(ctx: Context, kind: str, model: str | None, params: dict[str, Any] | None = None) -> dict[str, Any]:
    if model is not None:
        ctx.model(model)
    results = await call_router(ctx, "command", kind, model, params)
    return {"action": kind, "model": model, "instances": results}


async def offload(ctx: Context, model: str | None = None) -> dict[str, Any]:
    """Offload `model` to host RAM; every model on a GPU when `model` is None."""
    return await command(ctx, "offload", model)


async def release(ctx: Context, model: str | None = None) -> dict[str, Any]:
    """Drop `model`'s weights; every model when `model` is None (each waits for its requests)."""
    return await command(ctx, "release", model)


async def load(ctx: Context, model: str | None) -> dict[str, Any]:
    """Preheat every replica of the model; with none (scaled to zero), ask Serve for one."""
    if model is None:
        raise InvalidRequest("model is required for /gpu/load", param="model")
    ctx.model(model)
    ctx.require_schedulable(model)  # else Serve would wait for a replica forever
    result = await command(ctx, "load", model)
    if result["instances"]:
        return result
    try:
        status = await ctx.handles[model].preheat.remote()
    except Exception as exc:
        raise unwrap(exc) from None
    return {
        "action": "load",
        "model": model,
        "instances": [{"model": model, "replica": status["replica"], "outcome": "loaded", "state": status["state"]}],
    }


def _timeout(name: str, value: float | None, *, zero_ok: bool) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidRequest(f"{name} must be a finite number of seconds (got {value!r})", param=name)
    if value < 0 or (value == 0 and not zero_ok):
        bound = ">= 0 (0: offload right after use)" if zero_ok else "> 0"
        raise InvalidRequest(f"{name} must be {bound} (got {value!r})", param=name)
    return float(value)


async def set_timeouts(
    ctx: Context, model: str | None, idle_timeout_s: float | None = None, release_timeout_s: float | None = None
) -> dict[str, Any]:
    """Change a model's timeouts at run time (every model's when `model` is None)."""
    params = {
        k: v
        for k, v in (
            ("idle_timeout_s", _timeout("idle_timeout_s", idle_timeout_s, zero_ok=True)),
            ("release_timeout_s", _timeout("release_timeout_s", release_timeout_s, zero_ok=False)),
        )
        if v is not None
    }
    if not params:
        raise InvalidRequest("give idle_timeout_s and/or release_timeout_s", param="idle_timeout_s")
    result = await command(ctx, "policy", model, params)
    result["policy"] = params
    return result
