"""The router's shell logic without Ray: registration, admission, stale readings, status."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from serve_app.cluster.router import Router

MiB = 1024**2


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def app(**router: Any) -> dict[str, Any]:
    return {
        "models": [
            {"id": "a", "family": "sentence-transformers", "source": "hub:org/a"},
            {"id": "b", "family": "sentence-transformers", "source": "hub:org/b"},
        ],
        "router": {"margin_bytes": 0, "margin_fraction": 0.0, **router},
    }


def info(replica: str, model: str, state: str = "unloaded", bytes_gpu: int = 0, bytes_cpu: int = 0,
         seq: int = 0, idle_s: float = 10.0, weights: int | None = None) -> dict[str, Any]:
    return {
        "replica": replica, "model": model, "node": "node-1", "gpus": ["gpu-0"],
        "declared_bytes": None, "weights_bytes": weights,
        "status": {"state": state, "seq": seq, "bytes_gpu": bytes_gpu, "bytes_cpu": bytes_cpu, "in_flight": 0,
                   "waiting": 0, "idle_s": idle_s, "idle_in_state_s": idle_s, "since_s": idle_s, "reason": "test"},
    }


def reading(used: int, total: int = 1000 * MiB, simulated: bool = False) -> dict[str, Any]:
    return {"uuid": "gpu-0", "index": 0, "name": "GPU", "total_bytes": total, "used_bytes": used,
            "free_bytes": total - used, "processes": [], "simulated": simulated}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


async def test_status_lists_configured_models_without_replicas(clock: FakeClock) -> None:
    router = Router(app(), clock=clock, start_loops=False)
    doc = await router.status()
    assert [(m["model"], m["state"], m["replica"]) for m in doc["models"]] == [
        ("a", "unloaded", None), ("b", "unloaded", None)
    ]
    await router.register(info("r1", "a", "gpu", bytes_gpu=100 * MiB))
    doc = await router.status()
    rows = {m["model"]: m for m in doc["models"]}
    assert rows["a"]["replica"] == "r1" and rows["a"]["state"] == "gpu" and rows["b"]["replica"] is None
    await router.deregister("r1")
    assert (await router.status())["models"][0]["replica"] is None


async def test_admission_waits_for_room_and_is_granted_when_it_frees(clock: FakeClock) -> None:
    router = Router(app(), clock=clock, start_loops=False)
    await router.report_gpus("node-1", [reading(used=0, simulated=True)], host_budget=0)
    await router.register(info("r1", "a", "gpu", bytes_gpu=900 * MiB, idle_s=0.0))
    router.replicas["r1"].info["status"]["in_flight"] = 1  # busy: cannot be evicted
    waiter = asyncio.ensure_future(router.admit(info("r2", "b", weights=100 * MiB), "req-1", "load", 30.0))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    queue = (await router.status())["queue"]
    assert queue and queue[0]["model"] == "b" and "MiB" in queue[0]["reason"]
    # The busy model finishes and is released: its bytes are gone, the next decision admits.
    await router.heartbeat(info("r1", "a", "unloaded", seq=3))
    router._decide_and_act()
    result = await asyncio.wait_for(waiter, 1.0)
    assert result["admitted"] is True and result["gpu"] == "gpu-0"
    # The reservation is counted until the replica reports past its load.
    assert router._instances()[1].bytes_gpu == 130 * MiB


async def test_timeout_answers_with_the_reason(clock: FakeClock) -> None:
    router = Router(app(), clock=clock, start_loops=False)
    await router.report_gpus("node-1", [reading(used=990 * MiB)], host_budget=0)
    result = await router.admit(info("r2", "b", weights=100 * MiB), "req-1", "load", 0.05)
    assert result["admitted"] is False and "free" in result["reason"]
    assert router.pending == {}


async def test_a_stale_nvml_reading_does_not_cause_a_second_eviction(clock: FakeClock) -> None:
    """NVML still shows an evicted model until the next probe read: the router subtracts it."""
    router = Router(app(), clock=clock, start_loops=False)
    await router.register(info("r1", "a", "gpu", bytes_gpu=500 * MiB))
    await router.report_gpus("node-1", [reading(used=500 * MiB)], host_budget=0)
    assert router.snapshot().gpus[0].free_bytes == 500 * MiB
    await router.heartbeat(info("r1", "a", "cpu", bytes_cpu=500 * MiB, seq=2))
    assert router.snapshot().gpus[0].used_bytes == 0
    await router.report_gpus("node-1", [reading(used=0)], host_budget=0)  # a fresh reading resets it
    assert router.snapshot().gpus[0].used_bytes == 0
    (gpu,) = (await router.status())["gpus"]
    assert gpu["free_bytes"] == 1000 * MiB and gpu["processes"] == [] and gpu["read_s_ago"] == 0


async def test_simulated_gpu_is_computed_from_accounting_and_external_use(clock: FakeClock) -> None:
    router = Router(app(), clock=clock, start_loops=False)
    await router.report_gpus("node-1", [reading(used=0, simulated=True)], host_budget=0)
    await router.register(info("r1", "a", "gpu", bytes_gpu=300 * MiB))
    await router.simulate_external("gpu-0", 200 * MiB)
    gpu = router.snapshot().gpus[0]
    assert gpu.used_bytes == 500 * MiB and gpu.free_bytes == 500 * MiB


async def test_policy_changes_reach_registered_replicas(clock: FakeClock) -> None:
    router = Router(app(request_timeout_s=0.2), clock=clock, start_loops=False)
    await router.register(info("r1", "a", "gpu"))
    pending = asyncio.ensure_future(router.command("policy", "a", {"idle_timeout_s": 0}))
    commands = await router.next_commands("r1", 1.0)
    assert commands[0]["kind"] == "policy" and commands[0]["policy"]["idle_timeout_s"] == 0
    await router.command_done("r1", commands[0]["id"], "policy updated", info("r1", "a", "gpu")["status"])
    results = await pending
    assert results == [{"model": "a", "replica": "r1", "outcome": "policy updated", "state": "gpu"}]
    assert (await router.register(info("r9", "a")))["idle_timeout_s"] == 0  # new replicas get it too


async def test_gpu_readings_show_their_age_and_go_stale(clock: FakeClock) -> None:
    """A probe that died stops reporting: its last reading is flagged, not shown as current."""
    router = Router(app(probe_interval_s=1.0), clock=clock, start_loops=False)
    await router.report_gpus("node-1", [reading(100 * MiB)], 0)
    clock.now += 2.0
    (gpu,) = (await router.status())["gpus"]
    assert gpu["read_s_ago"] == 2.0 and gpu["stale"] is False
    clock.now += 3.0
    (gpu,) = (await router.status())["gpus"]
    assert gpu["read_s_ago"] == 5.0 and gpu["stale"] is True
    await router.report_gpus("node-1", [reading(100 * MiB)], 0)  # the probe came back
    (gpu,) = (await router.status())["gpus"]
    assert gpu["read_s_ago"] == 0.0 and gpu["stale"] is False
