"""An open realtime session's hold (`Lifecycle.hold`): the model stays resident, commands
answer at once instead of waiting for the session's end, idle time counts from its end."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

import pytest

from serve_app.core.lifecycle import Lifecycle, LifecyclePolicy
from serve_app.core.states import ModelState
from tests.unit.core.test_lifecycle import FakeAdapter, FakeClock, inside, serve, settle, until

S = ModelState


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def adapter() -> Iterator[FakeAdapter]:
    fake = FakeAdapter()
    yield fake
    fake.open_all()


@pytest.fixture
def make(adapter: FakeAdapter, clock: FakeClock) -> Callable[..., Lifecycle]:
    def _make(**policy: object) -> Lifecycle:
        return Lifecycle(model="m", adapter=adapter, device="cpu", policy=LifecyclePolicy(**policy),  # type: ignore[arg-type]
                         clock=clock)

    return _make


class Session:
    """A hold kept open in a task until `end()`."""

    def __init__(self, lc: Lifecycle) -> None:
        self.entered = asyncio.Event()
        self._end = asyncio.Event()
        self.task = asyncio.ensure_future(self._run(lc))

    async def _run(self, lc: Lifecycle) -> None:
        async with lc.hold():
            self.entered.set()
            await self._end.wait()

    async def end(self) -> None:
        self._end.set()
        await asyncio.wait_for(self.task, 5)


async def test_a_hold_loads_the_model_and_counts_as_a_session(make: Callable[..., Lifecycle],
                                                              adapter: FakeAdapter) -> None:
    lc = make()
    s = Session(lc)
    await asyncio.wait_for(s.entered.wait(), 5)
    assert adapter.calls == ["load"] and lc.state is S.GPU
    assert lc.status()["sessions"] == 1 and lc.in_flight == 0
    await s.end()
    assert lc.status()["sessions"] == 0


async def test_offload_release_and_idle_timeouts_skip_a_held_model(make: Callable[..., Lifecycle],
                                                                  clock: FakeClock, adapter: FakeAdapter) -> None:
    lc = make(idle_timeout_s=1.0, release_timeout_s=1.0)
    s = Session(lc)
    await asyncio.wait_for(s.entered.wait(), 5)
    # Answered at once (a lease would make them wait for the session's end).
    offload = await asyncio.wait_for(lc.offload("admin"), 1)
    assert offload == "skipped: 1 open realtime session(s) keep the model resident"
    assert (await asyncio.wait_for(lc.release("admin"), 1)).startswith("skipped: 1 open realtime session")
    clock.advance(100)
    assert lc.idle_s() == 0.0
    assert await lc.enforce_idle() is None
    assert lc.state is S.GPU and adapter.calls == ["load"]
    # The session's own work (and a file request) still runs under leases meanwhile.
    assert await serve(lc) is S.GPU
    await s.end()
    # Idle time counts from the session's end, not from the load.
    assert lc.idle_s() == 0.0
    clock.advance(0.5)
    assert await lc.enforce_idle() is None
    clock.advance(0.6)
    assert (await lc.enforce_idle() or "").startswith("offloaded")
    assert lc.state is S.CPU


async def test_a_hold_cancels_a_queued_offload_and_restores_from_cpu(make: Callable[..., Lifecycle],
                                                                    adapter: FakeAdapter) -> None:
    lc = make()
    await serve(lc)
    assert await lc.offload("test") == "offloaded: cpu"
    s = Session(lc)
    await asyncio.wait_for(s.entered.wait(), 5)
    assert lc.state is S.GPU and adapter.calls == ["load", "to_cpu", "to_gpu"]
    await s.end()


async def test_cancelling_a_session_during_its_load_leaves_nothing_held(make: Callable[..., Lifecycle],
                                                                       adapter: FakeAdapter) -> None:
    lc = make()
    gate = adapter.block("load")
    s = Session(lc)
    await inside(adapter, "load")
    s.task.cancel()
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await s.task
    await until(lambda: lc._busy is None)
    assert lc.status()["sessions"] == 0 and lc.in_flight == 0
    assert await lc.offload("test") == "offloaded: cpu"


async def test_offload_after_use_waits_for_the_last_session(make: Callable[..., Lifecycle]) -> None:
    lc = make(idle_timeout_s=0)
    a, b = Session(lc), Session(lc)
    await asyncio.wait_for(asyncio.gather(a.entered.wait(), b.entered.wait()), 5)
    await serve(lc)  # a turn ends: not offloaded, sessions remain
    await a.end()
    await settle()
    assert lc.state is S.GPU
    await b.end()
    await until(lambda: lc.state is S.CPU)
