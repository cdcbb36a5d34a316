"""One test (or a few) per concurrency rule of `serve_app.core.lifecycle.Lifecycle`.

The clock is a `FakeClock` the tests advance; the adapter is a `FakeAdapter` that records its
calls, can be told to fail a method, and can block inside a method on a `threading.Event` to
stand in for a slow weight move (the lifecycle runs adapter calls in worker threads). There
are no sleeps: tests yield to the event loop with `asyncio.sleep(0)`, and wait for a worker
thread to enter a blocked call with `asyncio.to_thread(event.wait)`.
"""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator

import pytest

from serve_app.adapters import Footprint, ModelAdapter
from serve_app.core.lifecycle import Lifecycle, LifecyclePolicy, TransitionEvent
from serve_app.core.states import ModelState
from serve_app.errors import CapacityError, ModelLoadError

S = ModelState
MiB = 1024**2
TIMEOUT_S = 5.0  # wall-clock bound on any wait, so a broken rule fails instead of hanging


# --- fakes -------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeAdapter:
    """Implements `ModelAdapter`; `tier` says where the fake weights are."""

    def __init__(self, size_bytes: int = 64 * MiB) -> None:
        self.device = "cpu"
        self.size_bytes = size_bytes
        self.tier = "none"  # "none", "partial" (a load died half way), "gpu", "cpu"
        self.calls: list[str] = []
        self.fail: set[str] = set()
        self.gates: dict[str, threading.Event] = {}
        self.entered: defaultdict[str, threading.Event] = defaultdict(threading.Event)

    def block(self, method: str) -> threading.Event:
        """Make `method` wait inside the call until the returned event is set."""
        self.entered[method].clear()
        gate = self.gates[method] = threading.Event()
        return gate

    def open_all(self) -> None:
        for gate in self.gates.values():
            gate.set()

    def _call(self, method: str) -> None:
        self.calls.append(method)
        self.entered[method].set()
        gate = self.gates.get(method)
        if gate is not None and not gate.wait(TIMEOUT_S):
            raise TimeoutError(f"test never opened the {method} gate")
        if method in self.fail:
            raise RuntimeError(f"injected {method} failure")

    def load(self, device: str) -> None:
        self.device = device
        self.tier = "partial"
        self._call("load")
        self.tier = "gpu"

    def to_cpu(self) -> None:
        self._call("to_cpu")
        self.tier = "cpu"

    def to_gpu(self) -> None:
        self._call("to_gpu")  # a failure leaves the CPU copy intact
        self.tier = "gpu"

    def release(self) -> None:
        self._call("release")
        self.tier = "none"

    def footprint(self) -> Footprint:
        if self.tier == "gpu":
            return Footprint(bytes_gpu=self.size_bytes)
        if self.tier == "cpu":
            return Footprint(bytes_cpu=self.size_bytes)
        return Footprint()

    def weights_bytes(self) -> int | None:
        return self.size_bytes


class Request:
    """A request that holds its lease until `finish()`; records the states it saw while holding."""

    def __init__(self, lc: Lifecycle) -> None:
        self.lc = lc
        self.inside = asyncio.Event()
        self._finish = asyncio.Event()
        self.seen: list[ModelState] = []
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        async with self.lc.use():
            self.seen.append(self.lc.state)
            self.inside.set()
            await self._finish.wait()
            self.seen.append(self.lc.state)

    async def entered(self) -> None:
        await asyncio.wait_for(self.inside.wait(), TIMEOUT_S)

    async def finish(self) -> None:
        self._finish.set()
        await asyncio.wait_for(self.task, TIMEOUT_S)


# --- helpers -----------------------------------------------------------------------------------


async def settle(rounds: int = 50) -> None:
    """Let every task that can run without a worker thread reach its next wait."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def until(predicate: Callable[[], bool]) -> None:
    """Yield until `predicate()` holds (worker threads finish on their own)."""

    async def spin() -> None:
        while not predicate():
            await asyncio.sleep(0)

    await asyncio.wait_for(spin(), TIMEOUT_S)


async def inside(adapter: FakeAdapter, method: str) -> None:
    """Wait until a worker thread is inside `adapter.<method>`."""
    assert await asyncio.to_thread(adapter.entered[method].wait, TIMEOUT_S), f"{method} was never called"


async def serve(lc: Lifecycle) -> ModelState:
    """One quick request; returns the state it saw."""
    async with lc.use():
        return lc.state


def moves(events: list[TransitionEvent]) -> list[tuple[str, str]]:
    return [(e.old.value, e.new.value) for e in events]


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def adapter() -> Iterator[FakeAdapter]:
    fake = FakeAdapter()
    yield fake
    fake.open_all()  # never leave a worker thread blocked after a failed test


@pytest.fixture
def events() -> list[TransitionEvent]:
    return []


@pytest.fixture
def make(adapter: FakeAdapter, clock: FakeClock, events: list[TransitionEvent]) -> Callable[..., Lifecycle]:
    def _make(**policy: object) -> Lifecycle:
        return Lifecycle(
            model="m",
            adapter=adapter,
            device="cpu",
            policy=LifecyclePolicy(**policy),  # type: ignore[arg-type]
            clock=clock,
            on_event=events.append,
        )

    return _make


@pytest.fixture
def lc(make: Callable[..., Lifecycle]) -> Lifecycle:
    return make()


async def offloaded(lc: Lifecycle) -> None:
    await serve(lc)
    assert await lc.offload("test") == "offloaded: cpu"
    assert lc.state is S.CPU


# --- the fake itself ---------------------------------------------------------------------------


def test_fake_adapter_implements_the_protocol(adapter: FakeAdapter) -> None:
    assert isinstance(adapter, ModelAdapter)


# --- lazy loading ------------------------------------------------------------------------------


async def test_nothing_loads_before_the_first_request(lc: Lifecycle, adapter: FakeAdapter, clock: FakeClock) -> None:
    clock.advance(10_000)
    assert await lc.enforce_idle() is None
    await settle()
    assert adapter.calls == []
    assert lc.state is S.UNLOADED and lc.status()["bytes_gpu"] == 0

    assert await serve(lc) is S.GPU
    assert adapter.calls == ["load"]


async def test_preheat_loads_without_serving(lc: Lifecycle, adapter: FakeAdapter) -> None:
    assert await lc.load("preheat") == "gpu"
    assert adapter.calls == ["load"] and lc.in_flight == 0


async def test_concurrent_first_requests_cause_exactly_one_load(lc: Lifecycle, adapter: FakeAdapter) -> None:
    gate = adapter.block("load")
    requests = [Request(lc) for _ in range(5)]
    await inside(adapter, "load")
    await settle()
    assert lc.state is S.LOADING
    assert lc.status()["waiting"] == 4 and lc.in_flight == 0
    assert not any(r.inside.is_set() for r in requests)

    gate.set()
    for r in requests:
        await r.entered()
    assert lc.in_flight == 5
    for r in requests:
        await r.finish()
    assert adapter.calls == ["load"]
    assert lc.status()["loads"] == 1
    assert all(r.seen == [S.GPU, S.GPU] for r in requests)
    assert lc.in_flight == 0


# --- failed loads and restores -----------------------------------------------------------------


async def test_failed_load_fails_every_waiter_frees_memory_and_the_next_request_retries(
    lc: Lifecycle, adapter: FakeAdapter, events: list[TransitionEvent]
) -> None:
    adapter.fail.add("load")
    gate = adapter.block("load")
    requests = [Request(lc) for _ in range(3)]
    await inside(adapter, "load")
    await settle()
    gate.set()

    results = await asyncio.wait_for(asyncio.gather(*(r.task for r in requests), return_exceptions=True), TIMEOUT_S)
    assert all(isinstance(res, ModelLoadError) for res in results), results
    assert all(res.stage == "load" and "injected load failure" in res.message for res in results)  # type: ignore[union-attr]
    assert not any(r.inside.is_set() for r in requests)

    assert lc.state is S.UNLOADED
    assert lc.last_error is not None and "injected load failure" in lc.last_error
    assert adapter.calls == ["load", "release"]  # the partial allocation was freed
    assert adapter.tier == "none"
    status = lc.status()
    assert status["last_error"] == lc.last_error
    assert (status["bytes_gpu"], status["bytes_cpu"], status["in_flight"], status["waiting"]) == (0, 0, 0, 0)
    assert moves(events) == [("unloaded", "loading"), ("loading", "unloaded")]
    assert events[-1].error == lc.last_error

    adapter.fail.clear()
    assert await serve(lc) is S.GPU
    assert adapter.calls == ["load", "release", "load"]
    assert lc.last_error is None


async def test_failed_restore_keeps_the_cpu_copy(lc: Lifecycle, adapter: FakeAdapter) -> None:
    await offloaded(lc)
    adapter.fail.add("to_gpu")

    with pytest.raises(ModelLoadError) as info:
        await serve(lc)
    assert info.value.stage == "restore"
    assert lc.state is S.CPU and adapter.tier == "cpu"
    assert lc.last_error is not None and "injected to_gpu failure" in lc.last_error
    assert "release" not in adapter.calls
    assert lc.status()["bytes_cpu"] == adapter.size_bytes

    adapter.fail.clear()
    assert await serve(lc) is S.GPU  # the next request tries again from the CPU copy
    assert adapter.calls.count("load") == 1
    assert lc.last_error is None


async def test_failed_restore_with_failed_rollback_drops_the_weights(
    lc: Lifecycle, adapter: FakeAdapter, events: list[TransitionEvent]
) -> None:
    await offloaded(lc)
    adapter.fail.update({"to_gpu", "to_cpu"})

    with pytest.raises(ModelLoadError):
        await serve(lc)
    assert lc.state is S.UNLOADED
    assert adapter.calls[-3:] == ["to_gpu", "to_cpu", "release"]
    assert moves(events)[-2:] == [("cpu", "restoring"), ("restoring", "unloaded")]
    assert lc.status()["bytes_cpu"] == 0

    adapter.fail.clear()
    assert await serve(lc) is S.GPU
    assert adapter.calls[-1] == "load"


async def test_failed_offload_stays_on_the_gpu_and_says_so(lc: Lifecycle, adapter: FakeAdapter) -> None:
    await serve(lc)
    adapter.fail.add("to_cpu")
    outcome = await lc.offload("test")
    assert outcome.startswith("failed"), outcome
    assert lc.state is S.GPU and lc.last_error is not None
    assert await serve(lc) is S.GPU
    assert "to_gpu" not in adapter.calls


# --- moves wait for in-flight requests ----------------------------------------------------------


async def test_offload_waits_until_no_request_is_in_flight(
    lc: Lifecycle, adapter: FakeAdapter, events: list[TransitionEvent]
) -> None:
    first, second = Request(lc), Request(lc)
    await first.entered()
    await second.entered()
    before = len(events)
    offload = asyncio.create_task(lc.offload("test"))
    await settle()
    assert not offload.done() and lc.state is S.GPU

    await first.finish()
    await settle()
    assert not offload.done() and lc.state is S.GPU and "to_cpu" not in adapter.calls
    assert len(events) == before  # nothing moved while a lease was held

    await second.finish()
    assert await asyncio.wait_for(offload, TIMEOUT_S) == "offloaded: cpu"
    assert first.seen == second.seen == [S.GPU, S.GPU]
    assert lc.state is S.CPU and adapter.calls == ["load", "to_cpu"]


async def test_release_waits_until_no_request_is_in_flight(
    lc: Lifecycle, adapter: FakeAdapter, events: list[TransitionEvent]
) -> None:
    request = Request(lc)
    await request.entered()
    before = len(events)
    release = asyncio.create_task(lc.release("test"))
    await settle()
    assert not release.done() and lc.state is S.GPU and "release" not in adapter.calls
    assert len(events) == before

    await request.finish()
    assert await asyncio.wait_for(release, TIMEOUT_S) == "released"
    assert request.seen == [S.GPU, S.GPU]
    assert lc.state is S.UNLOADED and adapter.calls == ["load", "release"]


async def test_request_arriving_while_an_offload_is_queued_cancels_it(lc: Lifecycle, adapter: FakeAdapter) -> None:
    first = Request(lc)
    await first.entered()
    offload = asyncio.create_task(lc.offload("test"))
    await settle()
    assert not offload.done()

    second = Request(lc)
    await second.entered()
    outcome = await asyncio.wait_for(offload, TIMEOUT_S)
    assert outcome.startswith("cancelled"), outcome

    await first.finish()
    await second.finish()
    await settle()
    assert lc.state is S.GPU and adapter.calls == ["load"]


@pytest.mark.parametrize(
    ("move", "step", "moving", "outcome", "calls"),
    [
        ("offload", "to_cpu", S.OFFLOADING, "offloaded: cpu", ["load", "to_cpu", "to_gpu"]),
        ("release", "release", S.RELEASING, "released", ["load", "release", "load"]),
    ],
)
async def test_request_arriving_during_a_move_waits_then_gets_the_model_back(
    lc: Lifecycle, adapter: FakeAdapter, move: str, step: str, moving: S, outcome: str, calls: list[str]
) -> None:
    await serve(lc)
    gate = adapter.block(step)
    task = asyncio.create_task(getattr(lc, move)("test"))
    await inside(adapter, step)
    assert lc.state is moving

    request = Request(lc)
    await settle()
    assert not request.inside.is_set() and lc.status()["waiting"] == 1

    gate.set()
    assert await asyncio.wait_for(task, TIMEOUT_S) == outcome
    await request.entered()
    await request.finish()
    assert request.seen == [S.GPU, S.GPU]
    assert adapter.calls == calls


async def test_request_arriving_while_a_release_is_queued_waits_then_reloads(
    lc: Lifecycle, adapter: FakeAdapter
) -> None:
    first = Request(lc)
    await first.entered()
    release = asyncio.create_task(lc.release("test"))
    await settle()
    second = Request(lc)
    await settle()
    assert not release.done() and not second.inside.is_set()  # the release is not cancelled

    await first.finish()
    assert await asyncio.wait_for(release, TIMEOUT_S) == "released"
    await second.entered()
    await second.finish()
    assert first.seen == second.seen == [S.GPU, S.GPU]
    assert adapter.calls == ["load", "release", "load"]


# --- offload after use ------------------------------------------------------------------------


async def test_offload_after_use_offloads_when_the_last_request_ends(
    make: Callable[..., Lifecycle], adapter: FakeAdapter, events: list[TransitionEvent]
) -> None:
    lc = make(offload_after_use=True)
    first, second = Request(lc), Request(lc)
    await first.entered()
    await second.entered()

    await first.finish()
    await settle()
    assert lc.state is S.GPU and "to_cpu" not in adapter.calls  # another request still uses it

    await second.finish()
    await until(lambda: lc.state is S.CPU)
    assert adapter.calls == ["load", "to_cpu"]
    assert events[-2].reason == "offload after use"


async def test_offload_after_use_is_decided_when_the_last_request_ends(
    make: Callable[..., Lifecycle], adapter: FakeAdapter
) -> None:
    lc = make(offload_after_use=True)
    first, second = Request(lc), Request(lc)
    await first.entered()
    await second.entered()
    await first.finish()
    await settle()
    # Had the end of `first` queued an offload, it would now run when `second` ends even
    # though the policy changed in between.
    lc.policy.offload_after_use = False
    await second.finish()
    await settle()
    assert lc.state is S.GPU and adapter.calls == ["load"]


async def test_offload_after_use_skips_while_another_request_waits(
    make: Callable[..., Lifecycle], adapter: FakeAdapter
) -> None:
    lc = make(offload_after_use=True)
    gate = adapter.block("load")
    loader = asyncio.create_task(serve(lc))
    await inside(adapter, "load")
    waiter = Request(lc)
    await settle()
    assert lc.status()["waiting"] == 1

    gate.set()
    assert await asyncio.wait_for(loader, TIMEOUT_S) is S.GPU  # the loader's lease has ended
    await waiter.entered()
    await settle()
    assert "to_cpu" not in adapter.calls  # nothing moved between the two leases
    # Nothing was queued for later either: the loader's end was not the last use.
    lc.policy.offload_after_use = False
    await waiter.finish()
    await settle()
    assert lc.state is S.GPU and adapter.calls == ["load"]
    assert waiter.seen == [S.GPU, S.GPU]


async def test_idle_timeout_zero_behaves_like_offload_after_use(
    make: Callable[..., Lifecycle], adapter: FakeAdapter
) -> None:
    lc = make(idle_timeout_s=0, offload_after_use=False)
    assert await serve(lc) is S.GPU
    await until(lambda: lc.state is S.CPU)
    assert adapter.calls == ["load", "to_cpu"]


async def test_without_offload_after_use_the_model_stays_resident(lc: Lifecycle, adapter: FakeAdapter) -> None:
    await serve(lc)
    await settle()
    assert lc.state is S.GPU and adapter.calls == ["load"]


async def test_offload_after_use_never_offloads_a_pinned_model(
    make: Callable[..., Lifecycle], adapter: FakeAdapter
) -> None:
    lc = make(offload_after_use=True, pinned=True)
    await serve(lc)
    await settle()
    assert lc.state is S.GPU and adapter.calls == ["load"]


# --- idle enforcement -------------------------------------------------------------------------


async def test_enforce_idle_offloads_then_releases_on_the_clock(
    make: Callable[..., Lifecycle], adapter: FakeAdapter, clock: FakeClock
) -> None:
    lc = make(idle_timeout_s=10, release_timeout_s=100)
    await serve(lc)

    clock.advance(9)
    assert await lc.enforce_idle() is None and lc.state is S.GPU
    clock.advance(1)
    outcome = await lc.enforce_idle()
    assert outcome == "offloaded: cpu" and lc.state is S.CPU
    assert "idle_timeout_s" in lc.reason

    # release_timeout_s counts time on the CPU tier, not since the last request.
    clock.advance(99)
    assert await lc.enforce_idle() is None and lc.state is S.CPU
    clock.advance(1)
    assert await lc.enforce_idle() == "released"
    assert lc.state is S.UNLOADED and "release_timeout_s" in lc.reason
    assert adapter.calls == ["load", "to_cpu", "release"]


async def test_enforce_idle_uses_the_time_it_is_given(make: Callable[..., Lifecycle], clock: FakeClock) -> None:
    lc = make(idle_timeout_s=10)
    await serve(lc)
    assert await lc.enforce_idle(now=clock() + 9) is None
    assert await lc.enforce_idle(now=clock() + 10) == "offloaded: cpu"


async def test_enforce_idle_never_touches_a_pinned_model(
    make: Callable[..., Lifecycle], adapter: FakeAdapter, clock: FakeClock
) -> None:
    lc = make(idle_timeout_s=10, release_timeout_s=100, pinned=True)
    await serve(lc)
    clock.advance(10_000)
    assert await lc.enforce_idle() is None and lc.state is S.GPU

    assert await lc.offload("operator") == "offloaded: cpu"  # an explicit command still works
    clock.advance(10_000)
    assert await lc.enforce_idle() is None and lc.state is S.CPU
    assert adapter.calls == ["load", "to_cpu"]


async def test_enforce_idle_never_moves_a_model_with_requests_in_flight(
    make: Callable[..., Lifecycle], adapter: FakeAdapter, clock: FakeClock
) -> None:
    lc = make(idle_timeout_s=10, release_timeout_s=100)
    request = Request(lc)
    await request.entered()
    clock.advance(10_000)
    assert lc.idle_s() == 0.0
    assert await lc.enforce_idle() is None
    await settle()
    assert lc.state is S.GPU and adapter.calls == ["load"]

    await request.finish()  # the idle clock starts when the request ends
    clock.advance(9)
    assert await lc.enforce_idle() is None
    clock.advance(1)
    assert await lc.enforce_idle() == "offloaded: cpu"
    assert request.seen == [S.GPU, S.GPU]


async def test_policy_changes_take_effect_at_once(lc: Lifecycle, adapter: FakeAdapter, clock: FakeClock) -> None:
    await serve(lc)
    clock.advance(5)
    assert await lc.enforce_idle() is None  # default idle_timeout_s is 300

    lc.policy.pinned = True
    lc.policy.idle_timeout_s = 5
    assert await lc.enforce_idle() is None
    assert lc.status()["pinned"] is True and lc.status()["idle_timeout_s"] == 5

    lc.policy.pinned = False
    assert await lc.enforce_idle() == "offloaded: cpu"

    lc.policy.idle_timeout_s = None
    lc.policy.offload_after_use = True
    assert await serve(lc) is S.GPU
    await until(lambda: lc.state is S.CPU)

    lc.policy.offload_after_use = False
    await serve(lc)
    await settle()
    assert lc.state is S.GPU  # after-use offload is off again
    lc.policy.idle_timeout_s = 0.5
    clock.advance(1)
    assert await lc.enforce_idle() == "offloaded: cpu"
    clock.advance(1)
    assert await lc.enforce_idle() is None  # release_timeout_s is still 1800
    lc.policy.release_timeout_s = 1
    assert await lc.enforce_idle() == "released"
    assert adapter.calls == ["load", "to_cpu", "to_gpu", "to_cpu", "to_gpu", "to_cpu", "release"]


# --- events -------------------------------------------------------------------------------------


async def test_every_transition_emits_an_event_and_bumps_seq(
    lc: Lifecycle, adapter: FakeAdapter, clock: FakeClock, events: list[TransitionEvent]
) -> None:
    seqs: list[int] = []

    def observe(event: TransitionEvent) -> None:
        events.append(event)
        seqs.append(lc.seq)

    lc.on_event = observe
    assert lc.seq == 0
    await serve(lc)
    clock.advance(1)
    await lc.offload("idle test")
    clock.advance(1)
    await serve(lc)
    clock.advance(1)
    await lc.release("evicted for x")

    assert moves(events) == [
        ("unloaded", "loading"),
        ("loading", "gpu"),
        ("gpu", "offloading"),
        ("offloading", "cpu"),
        ("cpu", "restoring"),
        ("restoring", "gpu"),
        ("gpu", "releasing"),
        ("releasing", "unloaded"),
    ]
    assert [e.reason for e in events] == [
        "first request",
        "loaded",
        "idle test",
        "idle test",
        "request arrived",
        "restored",
        "evicted for x",
        "evicted for x",
    ]
    assert seqs == list(range(1, 9)) and lc.seq == 8
    assert all(e.model == "m" for e in events)
    assert [e.at for e in events] == [1000.0, 1000.0, 1001.0, 1001.0, 1002.0, 1002.0, 1003.0, 1003.0]
    # Completions carry how long the move took; starts do not.
    assert [e.duration_s is not None for e in events] == [False, True] * 4
    assert lc.status()["seq"] == 8 and lc.reason == "evicted for x"


async def test_a_failing_observer_does_not_break_a_transition(lc: Lifecycle) -> None:
    def broken(event: TransitionEvent) -> None:
        raise RuntimeError("observer bug")

    lc.on_event = broken
    assert await serve(lc) is S.GPU
    assert lc.seq == 2


async def test_a_reload_says_so(lc: Lifecycle, events: list[TransitionEvent]) -> None:
    await serve(lc)
    await lc.release("test")
    await serve(lc)
    assert events[-2].reason == "reload"


# --- admission ----------------------------------------------------------------------------------


async def test_admission_is_awaited_before_load_and_restore(lc: Lifecycle, adapter: FakeAdapter) -> None:
    seen: list[tuple[str, ModelState, list[str]]] = []
    allow = asyncio.Event()

    async def admit(kind: str) -> None:
        seen.append((kind, lc.state, list(adapter.calls)))
        await allow.wait()

    lc.admit = admit
    first = asyncio.create_task(serve(lc))
    await settle()
    assert seen == [("load", S.UNLOADED, [])]
    assert adapter.calls == [] and lc.state is S.UNLOADED  # nothing moves until admitted
    allow.set()
    assert await asyncio.wait_for(first, TIMEOUT_S) is S.GPU

    await serve(lc)  # already on the GPU: no admission needed
    assert len(seen) == 1

    await lc.offload("test")
    await serve(lc)
    assert seen[1] == ("restore", S.CPU, ["load", "to_cpu"])
    assert adapter.calls == ["load", "to_cpu", "to_gpu"]


async def test_capacity_error_on_load_reaches_every_waiting_request(
    lc: Lifecycle, adapter: FakeAdapter, events: list[TransitionEvent]
) -> None:
    decide = asyncio.Event()
    refuse = True

    async def admit(kind: str) -> None:
        await decide.wait()
        if refuse:
            raise CapacityError("no room on GPU 0", retry_after_s=7)

    lc.admit = admit
    requests = [asyncio.create_task(serve(lc)) for _ in range(3)]
    await settle()
    assert lc.status()["waiting"] == 2
    decide.set()
    results = await asyncio.wait_for(asyncio.gather(*requests, return_exceptions=True), TIMEOUT_S)
    assert all(type(res) is CapacityError for res in results), results  # not wrapped as a load error
    assert lc.state is S.UNLOADED and adapter.calls == [] and events == [] and lc.seq == 0
    assert lc.in_flight == 0 and lc.status()["waiting"] == 0

    refuse = False
    assert await serve(lc) is S.GPU
    assert adapter.calls == ["load"]


async def test_capacity_error_on_restore_leaves_the_model_on_cpu(
    lc: Lifecycle, adapter: FakeAdapter, events: list[TransitionEvent]
) -> None:
    await offloaded(lc)
    before = list(events)

    async def admit(kind: str) -> None:
        raise CapacityError(f"no room to {kind}")

    lc.admit = admit
    with pytest.raises(CapacityError, match="no room to restore"):
        await serve(lc)
    assert lc.state is S.CPU and events == before
    assert adapter.calls == ["load", "to_cpu"] and adapter.tier == "cpu"
    assert lc.in_flight == 0


# --- status -------------------------------------------------------------------------------------


async def test_status_reports_state_reason_footprint_and_timings(
    make: Callable[..., Lifecycle], adapter: FakeAdapter, clock: FakeClock
) -> None:
    lc = make(idle_timeout_s=60, release_timeout_s=600, priority=3)
    status = lc.status()
    assert set(status) == {
        "model", "state", "seq", "reason", "since_s", "device", "bytes_gpu", "bytes_cpu", "in_flight", "sessions",
        "waiting", "idle_s", "idle_in_state_s", "last_used_at", "idle_timeout_s", "release_timeout_s",
        "offload_after_use",
        "priority", "pinned", "last_load_s", "last_restore_s", "last_offload_s", "last_release_s",
        "last_error", "loads", "moves",
    }  # fmt: skip
    assert status["state"] == "unloaded" and status["reason"] == "created" and status["seq"] == 0
    assert status["last_load_s"] is None and status["last_error"] is None

    request = Request(lc)
    await request.entered()
    clock.advance(2.5)
    status = lc.status()
    assert status["model"] == "m" and status["device"] == "cpu"
    assert (status["state"], status["reason"], status["seq"]) == ("gpu", "loaded", 2)
    assert status["since_s"] == 2.5
    assert (status["bytes_gpu"], status["bytes_cpu"]) == (adapter.size_bytes, 0)
    assert (status["in_flight"], status["idle_s"]) == (1, 0.0)
    assert status["last_load_s"] is not None and status["last_load_s"] >= 0
    assert (status["idle_timeout_s"], status["release_timeout_s"]) == (60, 600)
    assert (status["priority"], status["pinned"], status["offload_after_use"]) == (3, False, False)

    await request.finish()
    clock.advance(4)
    status = lc.status()
    assert status["in_flight"] == 0 and status["idle_s"] == 4.0 and status["idle_in_state_s"] == 4.0
    assert status["last_used_at"] == clock() - 4

    await lc.offload("idle")
    status = lc.status()
    assert (status["state"], status["reason"], status["since_s"]) == ("cpu", "idle", 0.0)
    assert (status["bytes_gpu"], status["bytes_cpu"]) == (0, adapter.size_bytes)
    assert status["last_offload_s"] is not None

    await serve(lc)
    await lc.release("evicted")
    status = lc.status()
    assert status["last_restore_s"] is not None and status["last_release_s"] is not None
    assert (status["state"], status["bytes_gpu"], status["bytes_cpu"]) == ("unloaded", 0, 0)


# --- the request log and move counters the router's trace is built from ------------------------


async def test_requests_are_logged_with_arrival_and_hold_time_and_taken_once(lc: Lifecycle, clock: FakeClock) -> None:
    arrived = clock()
    async with lc.use():
        clock.advance(2.5)
    await lc.load("preheat")  # not a request: not logged
    assert lc.take_requests() == [(arrived, 2.5)]
    assert lc.take_requests() == []
    assert await lc.offload("test") == "offloaded: cpu"
    async with lc.use():
        pass
    assert lc.status()["moves"] == {"load": 1, "restore": 1, "offload": 1, "release": 0}


async def test_a_batch_logs_each_of_its_requests_at_its_own_arrival(lc: Lifecycle, clock: FakeClock) -> None:
    """A forward pass serving three queued requests is three requests in the trace, not one."""
    first = clock()
    clock.advance(0.5)
    second = clock()
    async with lc.use(arrivals=[first, second, second]):
        clock.advance(0.25)
    assert lc.take_requests() == [(first, 0.25), (second, 0.25), (second, 0.25)]


async def test_a_batch_whose_load_fails_logs_every_request_as_demand(lc: Lifecycle, adapter: FakeAdapter) -> None:
    adapter.fail.add("load")
    with pytest.raises(ModelLoadError):
        async with lc.use(arrivals=[1.0, 2.0]):
            pass
    assert lc.take_requests() == [(1.0, 0.0), (2.0, 0.0)]


async def test_a_request_whose_load_fails_is_logged_as_demand(lc: Lifecycle, adapter: FakeAdapter) -> None:
    adapter.fail.add("load")
    with pytest.raises(ModelLoadError):
        async with lc.use():
            pass
    assert [held for _, held in lc.take_requests()] == [0.0]
    assert lc.status()["moves"]["load"] == 0
