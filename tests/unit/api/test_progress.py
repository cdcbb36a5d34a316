"""Progress lines for a waiting stream, and the wait headers of a request that waited."""

from __future__ import annotations

import asyncio

from serve_app.api import progress
from serve_app.cluster.router import Router
from tests.unit.api.test_operations import context
from tests.unit.cluster.test_router import FakeClock, app, info


async def test_comment_lines_follow_the_load_until_the_first_event() -> None:
    router = Router(app(), clock=FakeClock(), start_loops=False)
    loading = info("r1", "a", "loading", idle_s=1.5)
    loading["status"]["last_load_s"] = 3.0
    await router.register(loading)
    pending: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    lines = []
    async for line in progress.comments(context(router), "a", pending, every_s=0.01):
        lines.append(line)
        if len(lines) == 2:
            pending.set_result("first chunk")
    assert lines == [": loading 'a' on gpu-0, 1.5 of ~3 s\n\n"] * 2
    # No replica yet (scaled to zero): the line says so.
    assert await progress.status_line(context(router), "b") == "waiting for 'b' to start"


async def test_first_event_within_the_grace_needs_no_progress() -> None:
    async def gen():  # type: ignore[no-untyped-def]
        yield {"ready": True}

    first, pending = await progress.first_event(gen(), grace_s=1.0)
    assert first == {"ready": True} and pending is None

    async def slow():  # type: ignore[no-untyped-def]
        await asyncio.sleep(0.2)
        yield {"ready": True}

    first, pending = await progress.first_event(slow(), grace_s=0.01)
    assert first is None and pending is not None and (await pending) == {"ready": True}


def test_wait_headers_come_from_the_admit_and_the_load() -> None:
    events = [
        {"kind": "decision", "action": "wait", "at": 100.5, "model": "a"},
        {"kind": "decision", "action": "admit", "at": 102.0, "model": "a"},
        {"kind": "transition", "from": "unloaded", "to": "loading", "at": 102.0, "model": "a"},
        {"kind": "transition", "from": "loading", "to": "gpu", "at": 104.5, "seconds": 2.5, "model": "a"},
    ]
    assert progress.waited_for(events, 100.0) == {"X-GPU-Serve-Wait-S": "2.000", "X-GPU-Serve-Load-S": "2.500"}
    assert progress.waited_for([], 100.0) == {}
