"""The shared admin operations over the real router logic (in process)."""

from __future__ import annotations

import pytest

from serve_app.api import operations
from serve_app.api.context import Context
from serve_app.cluster.router import Router
from serve_app.config import AppConfig
from serve_app.errors import InvalidRequest, ModelNotFound
from tests.unit.api.test_events import InProcess
from tests.unit.cluster.test_router import FakeClock, MiB, app, info


def context(router: Router) -> Context:
    return Context(config=AppConfig.model_validate(app()), handles={}, router=InProcess(router))


async def test_a_load_in_flight_carries_a_progress_estimate() -> None:
    router = Router(app(), clock=FakeClock(), start_loops=False)
    loading = info("r1", "a", "loading", idle_s=1.0)
    loading["status"]["last_load_s"] = 4.0
    await router.register(loading)
    await router.register(info("r2", "b", "gpu", bytes_gpu=10 * MiB))
    doc = await operations.gpu_status(context(router))
    rows = {r["model"]: r for r in doc["models"]}
    assert rows["a"]["progress"] == {
        "kind": "load", "elapsed_s": 1.0, "expected_s": 4.0, "fraction": 0.25, "basis": "last load"
    }
    assert rows["b"]["progress"] is None and doc["unschedulable"] == {}


async def test_bad_commands_name_what_is_wrong() -> None:
    ctx = context(Router(app(), clock=FakeClock(), start_loops=False))
    with pytest.raises(ModelNotFound, match="'zzz'"):
        await operations.offload(ctx, "zzz")
    with pytest.raises(InvalidRequest, match="model is required"):
        await operations.load(ctx, None)
    with pytest.raises(InvalidRequest, match=r"release_timeout_s must be > 0 \(got 0\)"):
        await operations.set_timeouts(ctx, "a", release_timeout_s=0)
    with pytest.raises(InvalidRequest, match=r"idle_timeout_s must be a finite number"):
        await operations.set_timeouts(ctx, "a", idle_timeout_s=float("nan"))
    result = await operations.set_timeouts(ctx, "a", idle_timeout_s=0)
    assert result["policy"] == {"idle_timeout_s": 0.0}
    assert [m["id"] for m in operations.list_models(ctx)] == ["a", "b"]
