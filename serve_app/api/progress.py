"""Load progress for clients waiting on a streamed request.

A streamed request (`stream=true` for chat, completions or transcription) waits for its
model's first event. If that event comes within `GRACE_S` the response starts as before, so a
refusal (full GPU, failed load, bad audio) still gets its status code. If not, the model is
loading or waiting for room: the response starts and sends an SSE comment line about every
second, built from `/gpu/status`:

    : loading 'x' on GPU-0, 12.0 of ~30 s

OpenAI clients ignore comment lines; curl users see them. The first data chunk follows as
soon as the model is ready; an error after that point travels as an error event.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from serve_app.api.context import Context
from serve_app.core.progress import describe

logger = logging.getLogger("serve_app.api.progress")

#: A model already on its device answers within this; longer means a load or a wait.
GRACE_S = 0.75
EVERY_S = 1.0


async def first_event(gen: Any, grace_s: float = GRACE_S) -> tuple[Any, asyncio.Future[Any] | None]:
    """`(event, None)` when the first event came within `grace_s` (its errors raise here, before
    any header is sent), else `(None, pending)` with the first event still to come."""
    pending: asyncio.Future[Any] = asyncio.ensure_future(gen.__anext__())
    done, _ = await asyncio.wait({pending}, timeout=grace_s)
    if done:
        return pending.result(), None
    return None, pending


async def status_line(ctx: Context, model: str) -> str:
    """What the router says about `model` now, as one progress line."""
    from serve_app.api import operations

    try:
        doc = await asyncio.wait_for(operations.gpu_status(ctx), timeout=EVERY_S)
    except Exception as exc:  # the line is a courtesy: never fail the request over it
        return f"waiting for {model!r} (status unavailable: {type(exc).__name__})"
    rows = [r for r in doc.get("models", ()) if r.get("model") == model]
    moving = next((r for r in rows if r.get("progress")), None)
    queued = next((q for q in doc.get("queue", ()) if q.get("model") == model), None)
    if moving is not None:
        return describe(model, moving["progress"], moving.get("gpu"), None)
    return describe(model, None, None, queued)


async def comments(
    ctx: Context, model: str, pending: asyncio.Future[Any], every_s: float = EVERY_S
) -> AsyncIterator[str]:
    """SSE comment lines until `pending` is done (its result or error is the caller's to take)."""
    while not pending.done():
        line = (await status_line(ctx, model)).replace("\n", " ")
        yield f": {line}\n\n"
        await asyncio.wait({pending}, timeout=every_s)


#: Response headers of a non-streamed request that waited for its model.
WAIT_HEADER, LOAD_HEADER = "X-GPU-Serve-Wait-S", "X-GPU-Serve-Load-S"


def waited_for(events: list[dict[str, Any]], started_wall: float) -> dict[str, str]:
    """Headers from the model's events during a request: how long it waited for admission (to
    the router's admit) and how long the load or restore it waited on took."""
    headers: dict[str, str] = {}
    admit = next((e for e in events if e.get("action") == "admit"), None)
    if admit is not None:
        headers[WAIT_HEADER] = f"{max(0.0, float(admit['at']) - started_wall):.3f}"
    moved = [e for e in events if e.get("to") == "gpu" and e.get("from") in ("loading", "restoring")]
    if moved and moved[0].get("seconds") is not None:
        headers[LOAD_HEADER] = f"{float(moved[0]['seconds']):.3f}"
        headers.setdefault(WAIT_HEADER, "0.000")
    return headers


async def wait_headers(ctx: Context, model: str, started_wall: float, elapsed_s: float) -> dict[str, str]:
    """For a request slower than `GRACE_S` (a fast one never waited): ask the router once."""
    from serve_app.api.operations import call_router

    if elapsed_s < GRACE_S:
        return {}
    try:
        events = await asyncio.wait_for(call_router(ctx, "recent_events", model, started_wall), timeout=2.0)
    except Exception as exc:  # a courtesy header must never fail the request
        logger.debug("no wait headers for %r: %s", model, type(exc).__name__)
        return {}
    return waited_for(events, started_wall)
