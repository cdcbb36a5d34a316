"""One test per placement rule of `serve_app.core.policy.decide`.

No clock and no sleeps: every test passes `now` itself. Snapshots are built by `world()`, which
makes the probe see what our instances hold plus what "other processes" use, like a real GPU.
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from serve_app.core.policy import (
    accounted_bytes,
    decide,
    effective_priority,
    estimate_need_bytes,
    gpu_free_bytes,
    margin_bytes,
    queue_order,
)
from serve_app.core.snapshot import (
    Action,
    Admit,
    GpuView,
    InstanceView,
    Offload,
    PendingLoad,
    PolicyLimits,
    Release,
    Snapshot,
    Wait,
)
from serve_app.core.states import HOLDS_GPU, ModelState

S = ModelState
GiB = 1024**3
MiB = 1024**2
NO_MARGIN = PolicyLimits(margin_fraction=0.0, margin_bytes=0, max_loads_per_gpu=8)


def inst(
    model: str,
    gib: float = 4,
    *,
    gpu: str | None = "g0",
    state: S = S.GPU,
    last_used: float = 0.0,
    in_flight: int = 0,
    priority: int = 0,
    pinned: bool = False,
    idle: float | None = None,
    release: float | None = None,
    node: str = "n0",
) -> InstanceView:
    size = int(gib * GiB)
    on_gpu = state in HOLDS_GPU
    return InstanceView(
        model=model,
        replica=f"r-{model}",
        node=node,
        gpu=gpu,
        state=state,
        bytes_gpu=size if on_gpu else 0,
        bytes_cpu=size if state in (S.CPU, S.OFFLOADING, S.RESTORING) else 0,
        last_used_at=last_used,
        in_flight=in_flight,
        priority=priority,
        idle_timeout_s=idle,
        release_timeout_s=release,
        pinned=pinned,
    )


def req(
    model: str,
    gib: float,
    *,
    gpus: tuple[str, ...] = ("g0",),
    priority: int = 0,
    at: float = 0.0,
    rid: str | None = None,
    node: str = "n0",
) -> PendingLoad:
    return PendingLoad(
        request_id=rid or f"req-{model}",
        model=model,
        replica=f"r-{model}",
        node=node,
        gpus=gpus,
        bytes_needed=int(gib * GiB),
        priority=priority,
        enqueued_at=at,
    )


def world(
    instances: list[InstanceView] = (),  # type: ignore[assignment]
    pending: list[PendingLoad] = (),  # type: ignore[assignment]
    *,
    gpus: dict[str, float] | None = None,
    external: dict[str, float] | None = None,
    probe_sees_ours: bool = True,
    budget: dict[str, float] | None = None,
    limits: PolicyLimits = NO_MARGIN,
) -> Snapshot:
    """GPUs of the given GiB; the probe reports our accounted bytes (optionally) + external."""
    gpus = gpus or {"g0": 16}
    external = external or {}
    views = []
    for i, (uuid, total_gib) in enumerate(sorted(gpus.items())):
        total = int(total_gib * GiB)
        used = int(external.get(uuid, 0) * GiB)
        if probe_sees_ours:
            used += accounted_bytes(uuid, instances)
        used = min(used, total)
        views.append(GpuView(uuid, "n0", i, total, used, total - used))
    return Snapshot(
        gpus=tuple(views),
        instances=tuple(instances),
        pending=tuple(pending),
        host_budget_bytes={n: int(b * GiB) for n, b in (budget if budget is not None else {"n0": 1024}).items()},
        limits=limits,
    )


def admits(actions: list[Action]) -> dict[str, str]:
    return {a.request_id: a.gpu for a in actions if isinstance(a, Admit)}


def waits(actions: list[Action]) -> dict[str, str]:
    return {a.request_id: a.reason for a in actions if isinstance(a, Wait)}


def offloaded(actions: list[Action]) -> list[str]:
    return [a.model for a in actions if isinstance(a, Offload)]


def released(actions: list[Action]) -> list[str]:
    return [a.model for a in actions if isinstance(a, Release)]


def evicted(actions: list[Action]) -> list[str]:
    return [a.model for a in actions if isinstance(a, Offload | Release)]


# --- helpers ------------------------------------------------------------------------------


def test_estimate_need_prefers_measured_then_declared_then_weights() -> None:
    assert estimate_need_bytes(1000, 5000, 9000, 1.2, 1.3) == 1200
    assert estimate_need_bytes(None, 5000, 9000, 1.2, 1.3) == 5000
    assert estimate_need_bytes(None, None, 1000, 1.2, 1.3) == 1300
    assert estimate_need_bytes(None, None, None, 1.2, 1.3) is None
    assert estimate_need_bytes(0, None, None, 1.2, 1.3) is None  # 0 means "not measured"


def test_margin_is_the_larger_of_fraction_and_bytes() -> None:
    g = GpuView("g0", "n0", 0, 16 * GiB, 0, 16 * GiB)
    assert margin_bytes(g, PolicyLimits(margin_fraction=0.1, margin_bytes=512 * MiB)) == int(1.6 * GiB)
    assert margin_bytes(g, PolicyLimits(margin_fraction=0.01, margin_bytes=1 * GiB)) == 1 * GiB


def test_accounted_counts_only_states_that_hold_gpu_memory() -> None:
    instances = [
        inst(m, 1, state=st) for m, st in [("a", S.LOADING), ("b", S.GPU), ("c", S.OFFLOADING), ("d", S.RESTORING)]
    ]
    instances += [inst("e", 1, state=S.CPU), inst("f", 1, state=S.UNLOADED), inst("g", 1, gpu="g1")]
    assert accounted_bytes("g0", instances) == 4 * GiB


def test_gpu_free_bytes_takes_the_smaller_of_probe_and_accounting_minus_margin() -> None:
    limits = PolicyLimits(margin_fraction=0.0, margin_bytes=1 * GiB)
    g = GpuView("g0", "n0", 0, 16 * GiB, 10 * GiB, 6 * GiB)  # 10 GiB used by someone else
    assert gpu_free_bytes(g, [inst("a", 2)], limits) == 5 * GiB  # probe wins: 6 - 1
    g = GpuView("g0", "n0", 0, 16 * GiB, 0, 16 * GiB)  # probe has not seen our 12 GiB yet
    assert gpu_free_bytes(g, [inst("a", 12, state=S.LOADING)], limits) == 3 * GiB
    g = GpuView("g0", "n0", 0, 16 * GiB, 12 * GiB, 4 * GiB)  # ... and now it has
    assert gpu_free_bytes(g, [inst("a", 12, state=S.GPU)], limits) == 3 * GiB
    g = GpuView("g0", "n0", 0, 16 * GiB, 16 * GiB, 0)
    assert gpu_free_bytes(g, [], limits) == 0  # never negative


# --- placement ----------------------------------------------------------------------------


def test_best_fit_picks_the_gpu_with_least_room_left() -> None:
    snap = world(pending=[req("x", 4, gpus=("g0", "g1", "g2"))], gpus={"g0": 16, "g1": 6, "g2": 40})
    assert admits(decide(snap, 0.0)) == {"req-x": "g1"}


def test_only_the_requests_own_gpus_are_considered() -> None:
    snap = world(pending=[req("x", 4, gpus=("g2",))], gpus={"g0": 16, "g1": 6, "g2": 40})
    assert admits(decide(snap, 0.0)) == {"req-x": "g2"}


def test_margin_is_kept_free() -> None:
    limits = replace(NO_MARGIN, margin_fraction=0.1)  # 1.6 GiB of 16
    assert admits(decide(world(pending=[req("x", 14.4)], limits=limits), 0.0)) == {"req-x": "g0"}
    actions = decide(world(pending=[req("x", 14.5)], limits=limits), 0.0)
    assert admits(actions) == {}
    assert "needs 14.5 GiB, 14.4 GiB free on g0" in waits(actions)["req-x"]


def test_memory_of_other_processes_is_never_assumed_free() -> None:
    # Accounting alone says 16 GiB free; the probe sees 10 GiB used by another process.
    snap = world(pending=[req("x", 8)], external={"g0": 10})
    actions = decide(snap, 0.0)
    assert admits(actions) == {}
    assert "6.0 GiB free on g0" in waits(actions)["req-x"]


def test_reservations_the_probe_has_not_seen_yet_count() -> None:
    # A granted load has not allocated yet: the probe says 16 GiB free, accounting says 6.
    snap = world([inst("a", 10, state=S.LOADING)], [req("x", 8)], probe_sees_ours=False)
    assert admits(decide(snap, 0.0)) == {}


def test_unseen_reservations_and_other_processes_add_up() -> None:
    # 16 GiB: another process uses 4, a granted 6 GiB load has not allocated yet. Only 6 GiB are
    # really free; min(probe free 12, total - accounted 10) would admit 8 and over-commit.
    snap = world([inst("a", 6, state=S.LOADING)], [req("x", 8)], external={"g0": 4}, probe_sees_ours=False)
    actions = decide(snap, 0.0)
    assert admits(actions) == {}
    assert "6.0 GiB free on g0" in waits(actions)["req-x"]
    assert gpu_free_bytes(snap.gpus[0], snap.instances, snap.limits) == 6 * GiB
    assert admits(decide(replace(snap, pending=(req("x", 6),)), 0.0)) == {"req-x": "g0"}


def test_admits_in_one_decision_share_the_free_memory() -> None:
    snap = world(pending=[req("x", 6, at=1), req("y", 6, at=2), req("z", 6, at=3)])
    actions = decide(snap, 10.0)
    assert admits(actions) == {"req-x": "g0", "req-y": "g0"}
    assert set(waits(actions)) == {"req-z"}


def test_loads_per_gpu_limit_counts_loads_in_flight_and_earlier_admits() -> None:
    limits = replace(NO_MARGIN, max_loads_per_gpu=1)
    snap = world([inst("a", 2, state=S.RESTORING)], [req("x", 2)], limits=limits)
    actions = decide(snap, 0.0)
    assert admits(actions) == {}
    assert "load(s) are in flight" in waits(actions)["req-x"]
    # Two requests, one GPU, one load at a time: one admit now.
    snap = world(pending=[req("x", 2, at=1), req("y", 2, at=2)], limits=limits)
    assert admits(decide(snap, 10.0)) == {"req-x": "g0"}


def test_a_busy_gpu_is_skipped_for_one_that_is_free_to_load() -> None:
    limits = replace(NO_MARGIN, max_loads_per_gpu=1)
    snap = world(
        [inst("a", 2, state=S.LOADING)],
        [req("x", 2, gpus=("g0", "g1"))],
        gpus={"g0": 8, "g1": 40},
        limits=limits,
    )
    assert admits(decide(snap, 0.0)) == {"req-x": "g1"}


def test_evictions_wait_for_a_free_load_slot() -> None:
    """Nothing is evicted for a load that could not start yet; once the slot frees, it is."""
    limits = replace(NO_MARGIN, max_loads_per_gpu=1)
    snap = world([inst("a", 8), inst("b", 4, state=S.LOADING)], [req("x", 8)], limits=limits)
    actions = decide(snap, 10.0)
    assert evicted(actions) == [] and admits(actions) == {}
    assert "evictions are chosen when one finishes" in waits(actions)["req-x"]
    snap = world([inst("a", 8), inst("b", 4)], [req("x", 8)], limits=limits)
    assert offloaded(decide(snap, 10.0)) == ["a"]


def test_a_plans_offloads_share_the_host_room() -> None:
    """Two offloads that each fit the host budget alone, but not together, are priced as one
    offload and one release: here the single release on the other GPU is cheaper."""
    a = replace(inst("a", 6, last_used=0), request_rate_hz=0.01)
    b = replace(inst("b", 6, last_used=0), request_rate_hz=0.01)
    c = replace(inst("c", 12, gpu="g1", last_used=0), request_rate_hz=0.01, next_use_at=1100.0)
    snap = world([a, b, c], [req("x", 12, gpus=("g0", "g1"))], gpus={"g0": 12, "g1": 12}, budget={"n0": 6})
    assert evicted(decide(snap, 100.0)) == ["c"]


def test_max_models_per_gpu_skips_a_full_gpu() -> None:
    limits = replace(NO_MARGIN, max_models_per_gpu=2)
    resident = [inst("a", 1, in_flight=1), inst("b", 1, state=S.LOADING)]
    snap = world(resident, [req("x", 1, gpus=("g0", "g1"))], gpus={"g0": 8, "g1": 40}, limits=limits)
    assert admits(decide(snap, 0.0)) == {"req-x": "g1"}


def test_max_models_per_gpu_evicts_to_get_under_the_cap_even_when_bytes_fit() -> None:
    limits = replace(NO_MARGIN, max_models_per_gpu=2)
    snap = world([inst("a", 1, last_used=5), inst("b", 1, last_used=1)], [req("x", 1)], limits=limits)
    actions = decide(snap, 10.0)
    assert admits(actions) == {}
    assert offloaded(actions) == ["b"]


def test_queue_order_is_priority_then_arrival_then_id() -> None:
    # Room for one 10 GiB load; higher priority wins even though it came later.
    snap = world(pending=[req("lo", 10, priority=0, at=0), req("hi", 10, priority=1, at=1)])
    assert admits(decide(snap, 1.0)) == {"req-hi": "g0"}
    snap = world(pending=[req("late", 10, at=2), req("early", 10, at=1)])
    assert admits(decide(snap, 2.0)) == {"req-early": "g0"}
    snap = world(pending=[req("b", 10, at=1, rid="r2"), req("a", 10, at=1, rid="r1")])
    assert admits(decide(snap, 2.0)) == {"r1": "g0"}


def test_equal_effective_priority_goes_by_arrival() -> None:
    # Priority 0 after 30 s of aging (aging_s=30) ties priority 1 that just arrived.
    snap = world(pending=[req("new", 10, priority=1, at=30), req("old", 10, priority=0, at=0)])
    assert admits(decide(snap, 30.0)) == {"req-old": "g0"}


def test_aging_lets_an_old_low_priority_request_overtake_a_newer_higher_one() -> None:
    limits = replace(NO_MARGIN, aging_s=30.0)

    def winner(now: float) -> set[str]:
        # The high-priority request always arrived 5 s ago; the low one at t=0.
        snap = world(pending=[req("lo", 10, priority=0, at=0), req("hi", 10, priority=2, at=now - 5)], limits=limits)
        return set(admits(decide(snap, now)))

    assert winner(10.0) == {"req-hi"}
    assert winner(60.0) == {"req-hi"}  # 2.0 vs 2.17
    assert winner(80.0) == {"req-lo"}  # 2.67 vs 2.17
    assert effective_priority(req("lo", 1, at=0), 90.0, 30.0) == pytest.approx(3.0)


def test_queue_order_helper_matches_decide() -> None:
    pending = [req("a", 1, priority=1, at=5), req("b", 1, priority=0, at=0), req("c", 1, priority=1, at=2)]
    assert [p.model for p in queue_order(pending, 10.0, 30.0)] == ["c", "a", "b"]


# --- evictions ----------------------------------------------------------------------------


def full_gpu() -> list[InstanceView]:
    """16 GiB GPU filled with four idle 4 GiB models."""
    return [
        inst("old-hi", priority=1, last_used=0),
        inst("mid", priority=0, last_used=50),
        inst("oldest", priority=0, last_used=10),
        inst("newest", priority=0, last_used=100),
    ]


def test_eviction_order_is_priority_then_least_recently_used() -> None:
    actions = decide(world(full_gpu(), [req("x", 4, priority=1)]), 200.0)
    assert offloaded(actions) == ["oldest"]
    actions = decide(world(full_gpu(), [req("x", 8, priority=1)]), 200.0)
    assert offloaded(actions) == ["oldest", "mid"]
    actions = decide(world(full_gpu(), [req("x", 16, priority=1)]), 200.0)
    assert offloaded(actions) == ["oldest", "mid", "newest", "old-hi"]


def test_evicting_does_not_admit_in_the_same_decision() -> None:
    actions = decide(world(full_gpu(), [req("x", 4, priority=1)]), 200.0)
    assert admits(actions) == {}
    assert "waiting for 4.0 GiB to be freed there" in waits(actions)["req-x"]
    # Evictions come before the Wait they serve.
    assert [type(a) for a in actions] == [Offload, Wait]


def test_a_higher_priority_model_is_never_evicted_for_a_lower_priority_load() -> None:
    instances = [inst("vip", 12, priority=2)]
    actions = decide(world(instances, [req("x", 8, priority=1)]), 100.0)
    assert evicted(actions) == []
    assert "lower the model's footprint or raise capacity" in waits(actions)["req-x"]
    # Aging reorders the queue; it does not raise eviction rights.
    actions = decide(world(instances, [req("x", 8, priority=1, at=0)]), 10_000.0)
    assert evicted(actions) == []


def test_same_priority_may_be_evicted() -> None:
    actions = decide(world([inst("peer", 12, priority=1)], [req("x", 8, priority=1)]), 100.0)
    assert offloaded(actions) == ["peer"]


def test_pinned_instances_are_never_evicted_or_idled_out() -> None:
    instances = [
        inst("pin", 12, pinned=True, idle=1.0),
        inst("cpu-pin", 2, state=S.CPU, pinned=True, release=1.0),
    ]
    actions = decide(world(instances, [req("x", 8, priority=9)]), 1000.0)
    assert evicted(actions) == []
    assert set(waits(actions)) == {"req-x"}


def test_busy_instances_are_never_evicted_or_idled_out() -> None:
    actions = decide(world([inst("busy", 12, in_flight=1, idle=1.0)], [req("x", 8, priority=9)]), 1000.0)
    assert evicted(actions) == []


def test_offload_while_the_host_budget_allows_then_release() -> None:
    # 5 GiB host budget, 1 GiB already held by a CPU-tier model: room for one 4 GiB offload.
    instances = [*full_gpu(), inst("parked", 1, gpu=None, state=S.CPU)]
    actions = decide(world(instances, [req("x", 8, priority=1)], budget={"n0": 5}), 200.0)
    assert offloaded(actions) == ["oldest"]
    assert released(actions) == ["mid"]
    assert "host RAM budget on n0 has 0 MiB left, offload needs 4.0 GiB" in actions[1].reason


def test_a_node_without_a_budget_releases() -> None:
    actions = decide(world(full_gpu(), [req("x", 4, priority=1)], budget={}), 200.0)
    assert released(actions) == ["oldest"]


def test_the_gpu_needing_the_fewest_evicted_bytes_is_chosen() -> None:
    instances = [inst("big", 12, gpu="g0"), inst("small", 4, gpu="g1")]
    snap = world(instances, [req("x", 6, gpus=("g0", "g1"))], gpus={"g0": 16, "g1": 8})
    assert offloaded(decide(snap, 100.0)) == ["small"]


def test_memory_being_freed_is_reserved_for_the_request_it_was_freed_for() -> None:
    # 8 GiB free; "hi" needs 12, so "idle" (8 GiB) goes. "lo" (4 GiB) would fit in the free 8
    # GiB now, but the GPU is being freed for "hi".
    snap = world([inst("idle", 8)], [req("hi", 12, priority=2), req("lo", 4, priority=1)])
    actions = decide(snap, 100.0)
    assert offloaded(actions) == ["idle"]
    assert admits(actions) == {}
    assert "req-hi" in waits(actions)["req-lo"]


def test_offloads_in_progress_count_before_new_evictions() -> None:
    # Last tick started offloading "going" for this request: wait for it, evict nothing more.
    snap = world([inst("going", 8, state=S.OFFLOADING), inst("other", 4)], [req("x", 12)])
    actions = decide(snap, 100.0)
    assert evicted(actions) == []
    assert "waiting for 8.0 GiB to be freed there (0 idle model(s) evicted now)" in waits(actions)["req-x"]


def test_an_idle_offload_is_not_doubled_by_an_eviction() -> None:
    # "stale" times out this tick; the request waits for its bytes instead of evicting "fresh".
    instances = [inst("stale", 8, idle=10.0, last_used=0), inst("fresh", 4, last_used=95)]
    actions = decide(world(instances, [req("x", 12)]), 100.0)
    assert offloaded(actions) == ["stale"]
    assert "waiting for 8.0 GiB to be freed there (0 idle model(s) evicted now)" in waits(actions)["req-x"]


def test_a_too_big_request_says_why_and_does_not_block_smaller_ones() -> None:
    instances = [inst("idle", 4, last_used=0)]
    snap = world(instances, [req("huge", 100, priority=5, at=0), req("small", 2, priority=0, at=1)])
    actions = decide(snap, 10.0)
    assert waits(actions)["req-huge"] == (
        "needs 100.0 GiB, 16.0 GiB free on g0 after offloading 1 idle model(s); lower the model's "
        "footprint or raise capacity (busy, pinned and higher-priority models stay)"
    )
    assert evicted(actions) == []  # evicting would not have helped
    assert admits(actions) == {"req-small": "g0"}


def test_unknown_gpus_wait_with_a_pointer_to_the_probe() -> None:
    actions = decide(world(pending=[req("x", 1, gpus=("gone",))]), 0.0)
    assert "check the probe on node n0" in waits(actions)["req-x"]


def test_a_second_request_for_the_same_instance_waits() -> None:
    snap = world(pending=[req("x", 1, rid="r1", at=0), req("x", 1, rid="r2", at=1)])
    actions = decide(snap, 2.0)
    assert admits(actions) == {"r1": "g0"}
    assert set(waits(actions)) == {"r2"}


# --- idle transitions ---------------------------------------------------------------------


def test_idle_gpu_instance_is_offloaded_at_its_timeout() -> None:
    snap = world([inst("a", idle=300.0, last_used=0)])
    assert decide(snap, 299.9) == []
    actions = decide(snap, 300.0)
    assert offloaded(actions) == ["a"]
    assert actions[0].reason == "idle 300.0s >= idle_timeout_s 300.0"


def test_idle_offload_releases_when_the_host_budget_is_short() -> None:
    actions = decide(world([inst("a", 4, idle=1.0)], budget={"n0": 3}), 10.0)
    assert released(actions) == ["a"]


def test_idle_cpu_instance_is_released_at_its_timeout() -> None:
    # The host budget (6 GiB, 4 held) is short of what offloading "big" (8 GiB) would need.
    snap = world([inst("a", state=S.CPU, release=1800.0, idle=1.0), inst("big", 8, last_used=1e9)], budget={"n0": 6})
    assert decide(snap, 1799.0) == []
    assert released(decide(snap, 1800.0)) == ["a"]


def test_release_timeout_waits_while_the_host_budget_has_room_when_opted_in() -> None:
    """With `timeout_max_cost_s` set, host RAM within the budget is there for the tier: releasing a
    copy early only turns its next restore into a cold load. By default it is released."""
    instances = [inst("a", state=S.CPU, release=1800.0, idle=1.0), inst("big", 8, last_used=1e9)]
    lazy = replace(NO_MARGIN, timeout_max_cost_s=0.1)
    assert decide(world(instances, budget={"n0": 64}, limits=lazy), 1800.0) == []
    assert released(decide(world(instances, budget={"n0": 64}), 1800.0)) == ["a"]


def test_none_timeouts_never_fire() -> None:
    snap = world([inst("a", idle=None), inst("b", gpu=None, state=S.CPU, release=None)])
    assert decide(snap, 1e12) == []


def test_an_instance_about_to_be_restored_is_not_released() -> None:
    snap = world([inst("a", 4, state=S.CPU, release=1.0)], [req("a", 4)])
    actions = decide(snap, 100.0)
    assert released(actions) == []
    assert admits(actions) == {"req-a": "g0"}


# --- determinism --------------------------------------------------------------------------


def random_snapshot(seed: int) -> Snapshot:
    rng = random.Random(seed)
    gpus = {f"g{i}": rng.choice([8, 16, 24]) for i in range(3)}
    states = [S.GPU, S.GPU, S.CPU, S.LOADING, S.OFFLOADING, S.UNLOADED]
    instances = [
        inst(
            f"m{i}",
            rng.randrange(1, 6),
            gpu=rng.choice(list(gpus)),
            state=rng.choice(states),
            last_used=rng.uniform(0, 100),
            in_flight=rng.choice([0, 0, 1]),
            priority=rng.randrange(3),
            pinned=rng.random() < 0.1,
            idle=rng.choice([None, 30.0, 90.0]),
            release=rng.choice([None, 60.0]),
        )
        for i in range(12)
    ]
    pending = [
        req(
            f"p{i}",
            rng.randrange(1, 20),
            gpus=tuple(rng.sample(list(gpus), 2)),
            priority=rng.randrange(3),
            at=i,
        )
        for i in range(8)
    ]
    return world(instances, pending, gpus=gpus, external={"g1": 3}, budget={"n0": 6}, limits=PolicyLimits())


@pytest.mark.parametrize("seed", range(20))
def test_same_snapshot_same_actions_whatever_the_input_order(seed: int) -> None:
    snap = random_snapshot(seed)
    expected = decide(snap, 100.0)
    assert decide(snap, 100.0) == expected
    rng = random.Random(seed)
    shuffled = replace(
        snap,
        gpus=tuple(rng.sample(snap.gpus, len(snap.gpus))),
        instances=tuple(rng.sample(snap.instances, len(snap.instances))),
        pending=tuple(rng.sample(snap.pending, len(snap.pending))),
    )
    assert decide(shuffled, 100.0) == expected


def test_a_cheap_plan_on_a_gpu_busy_for_a_moment_beats_a_dear_one_now() -> None:
    """g1 could make room now only by evicting a model in use every few seconds; g0 needs one
    idle model offloaded, once its 0.2 s restore ends. The request waits for g0 then, and takes
    g1 at once when g0's load in flight is a long cold load instead."""
    limits = replace(NO_MARGIN, max_loads_per_gpu=1)
    hot = replace(inst("hot", 10, gpu="g1", last_used=99.0), request_rate_hz=0.5, restore_s=0.2, load_s=20.0)
    cold = replace(inst("cold", 4, last_used=0.0), request_rate_hz=0.001)
    gpus = {"g0": 12, "g1": 12}

    def snap(loading: InstanceView) -> Snapshot:
        pending = [req("x", 8, gpus=("g0", "g1"))]
        return world([loading, cold, hot], pending, gpus=gpus, budget={"n0": 10}, limits=limits)

    restoring = replace(inst("a", 2, state=S.RESTORING), restore_s=0.2)
    actions = decide(snap(restoring), 100.0)
    assert evicted(actions) == [] and admits(actions) == {}
    assert "once its load in flight ends" in waits(actions)["req-x"]
    # Once g0's restore is done, its plan is made: the idle model goes, the hot one stays.
    done = replace(restoring, state=S.GPU, bytes_cpu=0, last_used_at=100.0, request_rate_hz=1.0)
    assert offloaded(decide(snap(done), 100.2)) == ["cold"]
    # A cold load of 30 s in flight on g0: waiting costs more than evicting on g1 now.
    loading = replace(inst("a", 2, state=S.LOADING), load_s=30.0)
    assert evicted(decide(snap(loading), 100.0)) == ["hot"]
