"""The router's event journal: transitions from replica reports, decisions that changed something."""

from __future__ import annotations

import asyncio
import logging

import pytest

from serve_app.cluster.router import Router
from tests.unit.cluster.test_router import FakeClock, MiB, app, info, reading


def with_transitions(base: dict, *moves: tuple[str, str, float | None]) -> dict:
    base["transitions"] = [
        {"from": a, "to": b, "reason": "first request", "seconds": s, "bytes": 90 * MiB, "at": 5.0} for a, b, s in moves
    ]
    return base


async def test_transitions_in_a_heartbeat_become_events_and_leave_the_stored_info() -> None:
    router = Router(app(), clock=FakeClock(), start_loops=False)
    await router.register(info("r1", "a"))
    report = with_transitions(info("r1", "a", "gpu", bytes_gpu=90 * MiB, seq=2),
                              ("unloaded", "loading", None), ("loading", "gpu", 0.812))
    assert await router.heartbeat(report)
    assert "transitions" not in router.replicas["r1"].info
    doc = await router.events(0, 0.01)
    assert doc["last_seq"] == 2 and doc["missed"] == 0
    first, second = doc["events"]
    assert (first["from"], first["to"]) == ("unloaded", "loading")
    assert second == {
        "kind": "transition", "at": 5.0, "model": "a", "replica": "r1", "gpu": "gpu-0", "from": "loading",
        "to": "gpu", "reason": "first request", "seconds": 0.812, "bytes": 90 * MiB, "seq": 2,
    }


async def test_a_reader_waits_for_the_next_event() -> None:
    router = Router(app(), clock=FakeClock(), start_loops=False)
    await router.register(info("r1", "a"))
    reader = asyncio.ensure_future(router.events(0, 5.0))
    await asyncio.sleep(0.01)
    assert not reader.done()
    await router.heartbeat(with_transitions(info("r1", "a", "loading", seq=1), ("unloaded", "loading", None)))
    doc = await asyncio.wait_for(reader, 1.0)
    assert [e["to"] for e in doc["events"]] == ["loading"]
    # A reader ahead of the log (the router restarted) gets the ring from its start.
    assert len((await router.events(999, 0.01))["events"]) == 1


async def test_decisions_are_recorded_and_logged_once_each(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    router = Router(app(), clock=clock, start_loops=False)
    await router.report_gpus("node-1", [reading(used=0, simulated=True)], host_budget=0)
    await router.register(info("r1", "a", "gpu", bytes_gpu=900 * MiB, idle_s=0.0))
    router.replicas["r1"].info["status"]["in_flight"] = 1  # busy: the load must wait
    caplog.set_level(logging.INFO, logger="serve_app.cluster.router")
    waiter = asyncio.ensure_future(router.admit(info("r2", "b", weights=100 * MiB), "req-1", "load", 30.0))
    await asyncio.sleep(0.01)
    router._decide_and_act()
    router._decide_and_act()  # the same wait again: not news
    waits = [e for e in (await router.events(0, 0.01))["events"] if e.get("action") == "wait"]
    assert len(waits) == 1 and waits[0]["model"] == "b" and "MiB" in waits[0]["reason"]
    # The busy model goes idle: the policy evicts it for the waiting load, then admits it.
    router.replicas["r1"].info["status"]["in_flight"] = 0
    router._decide_and_act()
    actions = [e["action"] for e in (await router.events(0, 0.01))["events"]]
    assert "evict" in actions
    await router.command_done("r1", next(iter(router.registry.results)), "offloaded",
                              info("r1", "a", "cpu", bytes_cpu=900 * MiB, seq=3)["status"])
    router._decide_and_act()
    assert (await asyncio.wait_for(waiter, 1.0))["admitted"] is True
    events = (await router.events(0, 0.01))["events"]
    # The wait's reason changed once the eviction was ordered (waiting for the bytes to be freed).
    assert [e["action"] for e in events] == ["wait", "evict", "wait", "admit"]
    assert "waiting for 900 MiB to be freed" in events[2]["reason"]
    assert events[3]["gpu"] == "gpu-0" and events[3]["bytes"] == 130 * MiB
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Router decision")]
    assert len(lines) == 4 and "evict (release) model 'a'" in lines[1] and "admit (load) model 'b'" in lines[3]
