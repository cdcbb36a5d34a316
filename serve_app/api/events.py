"""`GET /gpu/events`: the router's events as server-sent events, for the status page and scripts.

    curl -N localhost:8000/gpu/events

Each event is `id: <seq>`, `event: transition|decision`, `data: {json}`. One long-poll per
ingress process reads the router's journal and fans each event out to every client through
its own bounded buffer (`core.events.DropBuffer`): a client that reads slower than events
arrive loses its oldest ones and gets `event: dropped` with the count, and neither the router
nor the other clients wait for it. `?after=SEQ` (or `Last-Event-ID`) replays what the router
still holds after SEQ first. Browsers' EventSource cannot send headers: pass `?api_key=KEY`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse

from serve_app.api.context import Context, request_context
from serve_app.api.operations import call_router
from serve_app.core.events import DropBuffer

logger = logging.getLogger("serve_app.api.events")
router = APIRouter()

#: Events a client may fall behind by before the oldest are dropped.
CLIENT_BUFFER = 256
#: How long one router long-poll waits; also the pump's reconnect pace after a failure.
POLL_S = 10.0
#: A comment line this often keeps proxies from closing an idle stream.
KEEPALIVE_S = 15.0


class Subscriber:
    def __init__(self, capacity: int) -> None:
        self.buffer = DropBuffer(capacity)
        self.ready = asyncio.Event()

    def put(self, event: dict[str, Any]) -> None:
        self.buffer.put(event)
        self.ready.set()


class EventHub:
    """One router long-poll for every client of this ingress process."""

    def __init__(self, poll_s: float = POLL_S, capacity: int = CLIENT_BUFFER) -> None:
        self.poll_s = poll_s
        self.capacity = capacity
        self.subscribers: set[Subscriber] = set()
        self.cursor: int | None = None
        self._task: asyncio.Task[None] | None = None

    def subscribe(self, ctx: Context) -> Subscriber:
        sub = Subscriber(self.capacity)
        self.subscribers.add(sub)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._pump(ctx))
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)

    async def _pump(self, ctx: Context) -> None:
        while self.subscribers:
            try:
                if self.cursor is None:  # start from now: history is replayed per client on request
                    self.cursor = int((await call_router(ctx, "events", 0, 0.0))["last_seq"])
                    continue
                doc = await call_router(ctx, "events", self.cursor, self.poll_s)
            except Exception as exc:  # the router restarts: keep the clients, retry
                logger.warning("event stream: router unreachable (%s); retrying", type(exc).__name__)
                await asyncio.sleep(min(self.poll_s, 2.0))
                continue
            for event in doc["events"]:
                for sub in list(self.subscribers):
                    sub.put(event)
            self.cursor = int(doc["last_seq"])
        self._task = None


_hub = EventHub()


def sse(event: dict[str, Any]) -> str:
    return f"id: {event['seq']}\nevent: {event['kind']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n"


async def _stream(
    request: Request, ctx: Context, after: int | None, replay: dict[str, Any] | None = None
) -> AsyncIterator[str]:
    sub = _hub.subscribe(ctx)
    try:
        yield "retry: 2000\n: connected to the gpu-serve event stream\n\n"
        last = -1
        if after is not None:
            doc = replay if replay is not None else await call_router(ctx, "events", after, 0.0)
            if doc["missed"]:
                yield f"event: dropped\ndata: {json.dumps({'dropped': doc['missed']})}\n\n"
            for event in doc["events"]:
                last = max(last, int(event["seq"]))
                yield sse(event)
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(sub.ready.wait(), timeout=KEEPALIVE_S)
            sub.ready.clear()
            dropped = sub.buffer.take_dropped()
            if dropped:
                yield f"event: dropped\ndata: {json.dumps({'dropped': dropped})}\n\n"
            events = sub.buffer.drain()
            if not events:
                if await request.is_disconnected():
                    return
                yield ": keepalive\n\n"
            for event in events:
                if int(event["seq"]) > last:
                    yield sse(event)
    finally:
        _hub.unsubscribe(sub)


@router.get("/gpu/events", response_class=StreamingResponse)
async def gpu_events(
    request: Request,
    after: int | None = Query(None, ge=0, description="Replay the events the router still holds after this id."),
    ctx: Context = Depends(request_context),
) -> StreamingResponse:
    """Lifecycle transitions and router decisions, as server-sent events."""
    last_id = request.headers.get("last-event-id")
    if after is None and last_id and last_id.isdigit():
        after = int(last_id)
    # Asked before the stream starts, so an unreachable router is a 503 now, not a silent stream.
    replay = await call_router(ctx, "events", after or 0, 0.0)
    return StreamingResponse(
        _stream(request, ctx, after, replay if after is not None else None), media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
