"""The router's trace ring and self-audit, fed the way replicas feed it (no Ray)."""

from __future__ import annotations

import csv
import io
from typing import Any

import pytest

from serve_app.cluster.router import Router
from tests.unit.cluster.test_router import FakeClock, MiB, app, info, reading


def moves_info(replica: str, model: str, state: str, moves: dict[str, int], requests: list[Any] | None = None,
               bytes_gpu: int = 0, bytes_cpu: int = 0, **timings: float) -> dict[str, Any]:
    doc = info(replica, model, state, bytes_gpu=bytes_gpu, bytes_cpu=bytes_cpu, idle_s=0.0)
    doc["status"].update({"moves": moves, "since_s": 0.0, **timings})
    doc["requests"] = requests or []
    return doc


async def test_reports_become_trace_rows_rates_and_audit_misses() -> None:
    clock = FakeClock()
    router = Router(app(), clock=clock, start_loops=False)
    await router.report_gpus("node-1", [reading(used=0, total=300 * MiB, simulated=True)], host_budget=0)
    zero = {"load": 0, "restore": 0, "offload": 0, "release": 0}
    await router.register(moves_info("r1", "a", "unloaded", zero))
    await router.register(moves_info("r2", "b", "unloaded", zero))
    # Each model loads once, then requests alternate; with room for one model (300 MiB, 200 each)
    # every switch is a miss for Belady too.
    clock.now = 110.0
    await router.heartbeat(moves_info("r1", "a", "gpu", {**zero, "load": 1}, [(1.0, 0.5)], bytes_gpu=200 * MiB,
                                      last_load_s=2.0))
    router._decide_and_act()
    clock.now = 120.0
    await router.heartbeat(moves_info("r1", "a", "unloaded", {**zero, "load": 1, "release": 1}, [],
                                      last_load_s=2.0, last_release_s=0.01))
    await router.heartbeat(moves_info("r2", "b", "gpu", {**zero, "load": 1}, [(0.5, 0.25), (0.1, 0.2)],
                                      bytes_gpu=200 * MiB, last_load_s=3.0))
    # The same request list is never taken twice: `requests` is popped from the report.
    router._decide_and_act()
    rows = list(csv.DictReader(io.StringIO(await router.trace_csv())))
    assert [(r["model"], float(r["time_s"]), float(r["duration_s"])) for r in rows] == [
        ("a", 0.0, 0.5), ("b", 10.5, 0.25), ("b", 10.9, 0.2)
    ]
    assert {r["bytes"] for r in rows} == {str(200 * MiB)}
    models = {r["model"]: r for r in csv.DictReader(io.StringIO(await router.trace_models_csv()))}
    assert float(models["a"]["cold_load_s"]) == 2.0 and float(models["b"]["cold_load_s"]) == 3.0
    snap = router.snapshot()
    rates = {i.model: i.request_rate_hz for i in snap.instances}
    assert rates["b"] > rates["a"] > 0
    assert {i.model: i.load_s for i in snap.instances} == {"a": 2.0, "b": 3.0}
    # The predicted next use, from each model's gaps as the simulator computes it (`GapHistory`):
    # 'b' arrived at 119.5 and 119.9 (one gap of 0.4 s, idle 0.1 s), 'a' once at 109 (no gap: as far
    # again as it has been idle).
    nxt = {i.model: i.next_use_at for i in snap.instances}
    assert nxt["b"] == pytest.approx(120.0 + 0.4 - 0.1) and nxt["a"] == pytest.approx(120.0 + 11.0)
    doc = (await router.status())["policy_audit"]
    assert doc["gpu_misses"] == 2 and doc["belady_misses"] == 2 and doc["ratio"] == 1.0
    assert doc["requests"] == 3 and doc["capacity_bytes"] == 300 * MiB


async def test_trace_ring_capacity_comes_from_the_config() -> None:
    router = Router(app(trace_capacity=2), clock=FakeClock(), start_loops=False)
    await router.register({**info("r1", "a"), "requests": [(3.0, 0.1), (2.0, 0.1), (1.0, 0.1)]})
    assert len((await router.trace_csv()).strip().splitlines()) == 3  # header + the newest 2
