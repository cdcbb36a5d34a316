"""The event stream's fan-out over the real router logic (in process), and its key rules."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

from fastapi import FastAPI
from starlette.testclient import TestClient

from serve_app.api import events as events_api
from serve_app.api.auth import AuthMiddleware, KeySet
from serve_app.api.context import Context
from serve_app.cluster.router import Router
from serve_app.config import AppConfig
from tests.unit.cluster.test_router import FakeClock, app, info

ADMIN = "sk-admin-0123456789"


class InProcess:
    """The router object behind an actor-handle-shaped facade (`handle.method.remote(...)`)."""

    def __init__(self, router: Router) -> None:
        self._router = router

    def __getattr__(self, name: str) -> Any:
        return SimpleNamespace(remote=getattr(self._router, name))


class Connected:
    async def is_disconnected(self) -> bool:
        return False


def transitions(n: int, start: int = 0) -> dict[str, Any]:
    report = info("r1", "a", "gpu", seq=start + n)
    report["transitions"] = [
        {"from": "gpu", "to": "offloading", "reason": f"t{start + i}", "seconds": None, "bytes": 1} for i in range(n)
    ]
    return report


async def next_frames(stream: Any, n: int) -> list[str]:
    return [await asyncio.wait_for(stream.__anext__(), 2.0) for _ in range(n)]


def parse(frame: str) -> tuple[str, dict[str, Any]]:
    fields = dict(line.split(": ", 1) for line in frame.strip().splitlines() if not line.startswith(":"))
    return fields["event"], json.loads(fields["data"])


async def test_a_client_gets_new_events_and_a_replay_on_request(monkeypatch: Any) -> None:
    router = Router(app(), clock=FakeClock(), start_loops=False)
    ctx = Context(config=AppConfig.model_validate(app()), handles={}, router=InProcess(router))
    monkeypatch.setattr(events_api, "_hub", events_api.EventHub(poll_s=0.2))
    await router.register(info("r1", "a"))
    await router.heartbeat(transitions(2))  # history before the client connects
    live = events_api._stream(Connected(), ctx, None)
    replay = events_api._stream(Connected(), ctx, 1)
    (hello,) = await next_frames(live, 1)
    assert hello.startswith("retry: 2000")
    _, first_replayed = await next_frames(replay, 2)
    assert parse(first_replayed)[1]["reason"] == "t1" and parse(first_replayed)[1]["seq"] == 2
    await asyncio.sleep(0.1)  # the hub's first poll positions it at the journal's end
    await router.heartbeat(transitions(1, start=2))
    kind, event = parse((await next_frames(live, 1))[0])
    assert kind == "transition" and event["reason"] == "t2" and event["seq"] == 3
    kind, event = parse((await next_frames(replay, 1))[0])
    assert event["seq"] == 3
    await live.aclose()
    await replay.aclose()
    assert events_api._hub.subscribers == set()


async def test_a_slow_client_loses_its_oldest_events_and_is_told_how_many(monkeypatch: Any) -> None:
    router = Router(app(), clock=FakeClock(), start_loops=False)
    ctx = Context(config=AppConfig.model_validate(app()), handles={}, router=InProcess(router))
    hub = events_api.EventHub(poll_s=0.2, capacity=5)
    monkeypatch.setattr(events_api, "_hub", hub)
    await router.register(info("r1", "a"))
    slow = events_api._stream(Connected(), ctx, None)
    await next_frames(slow, 1)
    await asyncio.sleep(0.1)
    # 12 events arrive while the client reads nothing: the router is never held up by it.
    await asyncio.wait_for(router.heartbeat(transitions(12)), 1.0)
    await asyncio.sleep(0.1)
    kind, body = parse((await next_frames(slow, 1))[0])
    assert kind == "dropped" and body == {"dropped": 7}
    got = [parse(f)[1]["reason"] for f in await next_frames(slow, 5)]
    assert got == ["t7", "t8", "t9", "t10", "t11"]
    await slow.aclose()


def test_the_event_stream_takes_the_key_as_a_query_parameter() -> None:
    http_app = FastAPI()
    http_app.get("/gpu/events")(lambda: {"ok": True})
    http_app.get("/gpu/status")(lambda: {"ok": True})
    keys = KeySet.from_keys([], [ADMIN])
    c = TestClient(AuthMiddleware(http_app, keys=lambda: keys))
    assert c.get("/gpu/events?api_key=" + ADMIN).status_code == 200
    assert c.get("/gpu/events").status_code == 401
    assert c.get("/gpu/events?api_key=wrong").status_code == 401
    # Elsewhere over HTTP a query parameter is still not a key.
    assert c.post("/gpu/offload?api_key=" + ADMIN).status_code == 401
