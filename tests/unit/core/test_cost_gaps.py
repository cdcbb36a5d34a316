"""The gap-history predictor of a model's next use and the release ranking built on it
(`serve_app/core/cost.py`: `GapHistory`, `expected_residual_s`; `policy.expected_cost_s`)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serve_app.core.cost import GapHistory, expected_residual_s
from serve_app.core.policy import decide, eviction_order, expected_cost_s
from serve_app.core.snapshot import Offload, Release
from serve_app.core.states import ModelState
from tests.unit.core.test_policy import NO_MARGIN, inst, released, req, world

S = ModelState


# --- the predictor on hand-made gap histories ----------------------------------------------------


def test_inside_a_burst_the_next_use_is_near_and_after_it_far() -> None:
    # A burst model: 3 s gaps inside bursts, a 2400 s silence between them.
    gaps = [3.0] * 30 + [2400.0] * 3
    inside = expected_residual_s(gaps, 1.0)
    after = expected_residual_s(gaps, 60.0)  # past every intra-burst gap: only the silences count
    assert inside < 2400.0 / 4  # the silences pull the mean up, but the burst gaps dominate
    assert after == pytest.approx(2400.0 - 60.0)
    assert expected_residual_s(gaps, 0.0) < after


def test_a_periodic_job_is_expected_one_period_after_its_last_run() -> None:
    gaps = [0.5] * 60 + [3600.0] * 4
    assert expected_residual_s(gaps, 600.0) == pytest.approx(3000.0)
    assert expected_residual_s(gaps, 3000.0) == pytest.approx(600.0)


def test_a_silence_longer_than_any_seen_predicts_the_age_itself() -> None:
    assert expected_residual_s([5.0, 10.0], 50.0) == pytest.approx(50.0)
    assert expected_residual_s([], 20.0) == pytest.approx(20.0)
    assert expected_residual_s([], 0.0) > 0  # never zero: it becomes a rate


def test_the_mean_residual_is_the_mean_of_the_longer_gaps_less_the_age() -> None:
    assert expected_residual_s([10.0, 20.0, 30.0], 15.0) == pytest.approx(25.0 - 15.0)
    assert expected_residual_s([10.0, 20.0, 30.0], -5.0) == pytest.approx(20.0)  # a clock skew reads as 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.01, 1e5), max_size=64), st.floats(0, 1e5))
def test_the_residual_is_positive_and_bounded(gaps: list[float], age: float) -> None:
    r = expected_residual_s(gaps, age)
    assert r > 0
    assert r <= max([age, *gaps, 1e-3]) + 1e-6


def test_gap_history_keeps_a_bounded_ring_and_ignores_late_arrivals() -> None:
    h = GapHistory(size=3)
    assert h.next_use_at("a", 5.0) is None  # never seen
    for t in (0.0, 1.0, 3.0, 6.0, 10.0):
        h.observe("a", t)
    assert h.gaps("a") == (2.0, 3.0, 4.0)
    h.observe("a", 7.0)  # reported late: no gap, no rewind
    assert h.gaps("a") == (2.0, 3.0, 4.0) and h.last_arrival("a") == 10.0
    # Idle 1 s: every gap is longer, mean 3 less the age.
    assert h.next_use_at("a", 11.0) == pytest.approx(11.0 + 3.0 - 1.0)
    # Idle 20 s, longer than any gap: predicted as far again.
    assert h.next_use_at("a", 30.0) == pytest.approx(50.0)
    h.observe("b", 4.0)
    assert h.gaps("b") == () and h.next_use_at("b", 6.0) == pytest.approx(8.0)


# --- the ranking -------------------------------------------------------------------------------------


def test_a_release_is_priced_by_the_predicted_next_use_not_the_recent_rate() -> None:
    """Both were busy a minute ago with the same rate; 'batch' ran its periodic job and is due in
    an hour, 'user' is expected back in 30 s: the release takes 'batch', although it is smaller."""
    batch = replace(inst("batch", 4, last_used=40), request_rate_hz=0.05, load_s=8.0, next_use_at=3700.0)
    user = replace(inst("user", 6, last_used=40), request_rate_hz=0.05, load_s=8.0, next_use_at=130.0)
    snap = world([batch, user], [req("x", 4)], gpus={"g0": 10}, budget={"n0": 0})
    assert released(decide(snap, 100.0)) == ["batch"]
    # Without a prediction the decayed rate and size decide: the larger one goes (per byte).
    plain = [replace(batch, next_use_at=None), replace(user, next_use_at=None)]
    assert released(decide(world(plain, [req("x", 4)], gpus={"g0": 10}, budget={"n0": 0}), 100.0)) == ["user"]


def test_an_offload_keeps_the_decayed_rate() -> None:
    """With room on the host the eviction is an offload: the restore is priced by the rate, so
    the gap prediction does not change it."""
    a = replace(inst("a", 4, last_used=90), request_rate_hz=0.1, load_s=8.0, restore_s=0.1, next_use_at=5000.0)
    b = replace(inst("b", 4, last_used=90), request_rate_hz=0.001, load_s=8.0, restore_s=0.1, next_use_at=101.0)
    assert expected_cost_s(a, NO_MARGIN, 100.0, offloaded=True) > expected_cost_s(b, NO_MARGIN, 100.0, offloaded=True)
    assert expected_cost_s(a, NO_MARGIN, 100.0, offloaded=False) < expected_cost_s(b, NO_MARGIN, 100.0, offloaded=False)
    acts = decide(world([a, b], [req("x", 4)], gpus={"g0": 8}, budget={"n0": 64}), 100.0)
    assert [x.model for x in acts if isinstance(x, Offload)] == ["b"]

    # `next_use_for_offloads` (the simulator's hindsight references) prices the restore by the
    # predicted next use as well: now 'a', due in 4,900 s, is the one offloaded.
    told = replace(NO_MARGIN, next_use_for_offloads=True)
    assert expected_cost_s(a, told, 100.0, offloaded=True) < expected_cost_s(b, told, 100.0, offloaded=True)
    snap = world([a, b], [req("x", 4)], gpus={"g0": 8}, budget={"n0": 64}, limits=told)
    assert [x.model for x in decide(snap, 100.0) if isinstance(x, Offload)] == ["a"]


def test_priority_stays_hard_over_the_prediction() -> None:
    far = replace(inst("far", 4, last_used=0, priority=2), load_s=8.0, next_use_at=1e6)
    near = replace(inst("near", 4, last_used=99), load_s=8.0, next_use_at=101.0)
    snap = world([far, near], [req("x", 4, priority=2)], gpus={"g0": 8}, budget={"n0": 0})
    assert released(decide(snap, 100.0)) == ["near"]
    keys = sorted([far, near], key=lambda i: eviction_order(i, NO_MARGIN, 0, 100.0))
    assert [i.model for i in keys] == ["near", "far"]
    # A base-priority request may not evict the priority-2 model even though it is predicted furthest.
    low = world([far, near], [req("x", 4, priority=0)], gpus={"g0": 8}, budget={"n0": 0})
    assert released(decide(low, 100.0)) == ["near"]


def test_nothing_busy_or_pinned_moves_however_far_its_predicted_next_use() -> None:
    busy = replace(inst("busy", 4, in_flight=1), load_s=8.0, next_use_at=1e6)
    pinned = replace(inst("pinned", 4, pinned=True), load_s=8.0, next_use_at=1e6)
    near = replace(inst("near", 4, last_used=99), load_s=8.0, next_use_at=100.5)
    acts = decide(world([busy, pinned, near], [req("x", 4)], gpus={"g0": 12}, budget={"n0": 0}), 100.0)
    moved = [a.model for a in acts if isinstance(a, Offload | Release)]
    assert moved == ["near"]


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 8), st.floats(0.5, 1e5), st.integers(0, 2), st.booleans(), st.booleans()),
        min_size=1,
        max_size=6,
    ),
    st.integers(0, 2),
)
def test_evictions_never_touch_busy_pinned_or_higher_priority_models(models: list, prio: int) -> None:
    insts = [
        replace(
            inst(f"m{i}", gib, priority=p, pinned=pin, in_flight=int(busy), last_used=50.0),
            load_s=2.0 + gib, next_use_at=100.0 + ahead,
        )
        for i, (gib, ahead, p, pin, busy) in enumerate(models)
    ]
    total = sum(g for g, *_ in models)
    acts = decide(world(insts, [req("x", 4, priority=prio)], gpus={"g0": total}, budget={"n0": 0}), 100.0)
    by_name = {i.model: i for i in insts}
    for a in acts:
        if isinstance(a, Offload | Release):
            victim = by_name[a.model]
            assert not victim.pinned and victim.in_flight == 0 and victim.priority <= prio
