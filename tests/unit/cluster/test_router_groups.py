"""Joint admission through the router's shell (no Ray): members ask from their own replicas, the
policy answers the group as one, and competing groups neither deadlock nor over-commit."""

from __future__ import annotations

import asyncio
from typing import Any

from serve_app.cluster.router import Router
from tests.unit.cluster.test_router import FakeClock, MiB, info, reading


def app(**router: Any) -> dict[str, Any]:
    path = "examples.byo.models:Codec"
    models = [{"id": m, "family": "python", "deployment": path} for m in ("a1", "a2", "b1", "b2")]
    return {"models": models, "router": {"margin_bytes": 0, "margin_fraction": 0.0, "max_loads_per_gpu": 4, **router}}


def member(replica: str, model: str, mib: int, state: str = "unloaded", seq: int = 0) -> dict[str, Any]:
    on_gpu = state == "gpu"
    doc = info(replica, model, state, bytes_gpu=mib * MiB if on_gpu else 0, bytes_cpu=0, seq=seq, weights=None)
    doc["declared_bytes"] = mib * MiB
    return doc


async def router_with_gpu(total_mib: int = 1000) -> Router:
    router = Router(app(), clock=FakeClock(), start_loops=False)
    await router.report_gpus("node-1", [reading(used=0, total=total_mib * MiB, simulated=True)], host_budget=0)
    return router


def admitted_bytes(router: Router) -> int:
    return sum(i.bytes_gpu for i in router._instances() if i.state.value in ("loading", "gpu", "restoring"))


async def test_two_groups_competing_for_one_gpu_run_one_after_the_other() -> None:
    router = await router_with_gpu(1000)
    def ask(group: str, models: tuple[str, str]) -> list[asyncio.Future[dict[str, Any]]]:
        return [asyncio.ensure_future(router.admit_group(member(f"r-{m}", m, 400), group, 2, 5.0)) for m in models]

    first = ask("first", ("a1", "a2"))
    await asyncio.sleep(0)
    second = ask("second", ("b1", "b2"))
    await asyncio.sleep(0.01)
    assert all(f.done() and f.result()["admitted"] for f in first)
    assert not any(f.done() for f in second), "800 of 1000 MiB granted: the second group must wait"
    assert admitted_bytes(router) <= 1000 * MiB
    queue = (await router.status())["queue"]
    assert {q["model"] for q in queue} == {"b1", "b2"} and all("group" in q["reason"] for q in queue)
    # The first group's members load, serve, and are released; the second is then admitted whole.
    for m in ("a1", "a2"):
        await router.release_hold(member(f"r-{m}", m, 400, "gpu", seq=2))
        await router.heartbeat(member(f"r-{m}", m, 400, "unloaded", seq=4))
    router._decide_and_act()
    results = await asyncio.wait_for(asyncio.gather(*second), 1.0)
    assert all(r["admitted"] and r["kind"] == "load" for r in results)
    assert admitted_bytes(router) <= 1000 * MiB


async def test_a_group_that_can_never_fit_is_answered_at_once() -> None:
    router = await router_with_gpu(1000)
    calls = [router.admit_group(member(f"r-{m}", m, 600), "big", 2, 30.0) for m in ("a1", "a2")]
    results = await asyncio.wait_for(asyncio.gather(*calls), 1.0)  # not after the 30 s timeout
    for r in results:
        assert r["admitted"] is False and r["never"] is True
        assert "never be resident together" in r["reason"] and "1000 MiB total" in r["reason"]
    assert router.pending == {}


async def test_a_resident_member_is_held_until_its_lease_is_taken() -> None:
    router = await router_with_gpu(1000)
    await router.register(member("r-a1", "a1", 300, "gpu"))
    calls = [
        router.admit_group(member("r-a1", "a1", 300, "gpu"), "g", 2, 5.0),
        router.admit_group(member("r-a2", "a2", 300), "g", 2, 5.0),
    ]
    resident, loading = await asyncio.wait_for(asyncio.gather(*calls), 1.0)
    assert resident["kind"] == "resident" and loading["kind"] == "load"
    held = {i.replica: i.in_flight for i in router._instances()}
    assert held["r-a1"] == 1, "held: nothing may evict it before its lease"
    await router.release_hold(member("r-a1", "a1", 300, "gpu"))
    assert {i.replica: i.in_flight for i in router._instances()}["r-a1"] == 0


async def test_a_failed_member_cancels_the_group_at_once() -> None:
    router = await router_with_gpu(1000)
    waiting = asyncio.ensure_future(router.admit_group(member("r-a1", "a1", 100), "g", 2, 30.0))
    await asyncio.sleep(0.01)
    assert not waiting.done() and "1 of its group's 2 models" in next(iter(router.pending.values())).reason
    await router.cancel_group("g")
    result = await asyncio.wait_for(waiting, 1.0)
    assert result["admitted"] is False and "failed" in result["reason"]


async def test_a_single_request_waiting_on_a_member_is_admitted_with_its_group() -> None:
    """The lifecycle runs one load per instance: a single request already waiting at the router
    holds it, and the member's lease waits for that load. Admitting the group must release it."""
    router = await router_with_gpu(1000)
    # Hold the GPU with another group first, so the single request for a1 has to queue. (Same
    # clock: the queue orders by request id, so the group "g/..." is decided before "single-a1".)
    blocker = [router.admit_group(member(f"r-{m}", m, 450), "blocker", 2, 5.0) for m in ("b1", "b2")]
    await asyncio.wait_for(asyncio.gather(*blocker), 1.0)
    single = asyncio.ensure_future(router.admit(member("r-a1", "a1", 300), "single-a1", "load", 5.0))
    group = [asyncio.ensure_future(router.admit_group(member(f"r-{m}", m, 300), "g", 2, 5.0)) for m in ("a1", "a2")]
    await asyncio.sleep(0.01)
    assert not single.done() and not any(f.done() for f in group)
    for m in ("b1", "b2"):
        await router.release_hold(member(f"r-{m}", m, 450, "gpu", seq=2))
        await router.heartbeat(member(f"r-{m}", m, 450, "unloaded", seq=4))
    router._decide_and_act()
    results = await asyncio.wait_for(asyncio.gather(single, *group), 1.0)
    assert all(r["admitted"] for r in results), results
