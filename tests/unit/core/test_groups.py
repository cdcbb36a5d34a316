"""Joint admission (`serve_app/core/groups.py`), one test per rule, through `decide`."""

from __future__ import annotations

from dataclasses import replace

from serve_app.core.policy import decide
from serve_app.core.snapshot import Admit, Offload, PendingLoad, Reject, Wait
from serve_app.core.states import ModelState
from tests.unit.core.test_policy import NO_MARGIN, GiB, admits, evicted, inst, req, waits, world

S = ModelState


def member(model: str, gib: float, group: str, size: int = 2, **kw: object) -> PendingLoad:
    return replace(req(model, gib, rid=f"{group}/{model}", **kw), group=group, group_size=size)  # type: ignore[arg-type]


def rejects(actions: list[object]) -> dict[str, str]:
    return {a.request_id: a.reason for a in actions if isinstance(a, Reject)}


def test_a_group_that_fits_is_admitted_together_in_one_decision() -> None:
    snap = world(pending=[member("codec", 2, "g"), member("lm", 8, "g")])
    assert admits(decide(snap, 0.0)) == {"g/codec": "g0", "g/lm": "g0"}


def test_a_group_waits_until_every_member_has_asked() -> None:
    snap = world(pending=[member("codec", 2, "g")])
    actions = decide(snap, 0.0)
    assert not admits(actions) and "1 of its group's 2 models have asked" in waits(actions)["g/codec"]


def test_a_resident_member_is_admitted_as_it_is_and_not_evicted_for_its_own_group() -> None:
    # codec is resident and idle; lm needs 10 of the 12 free: evicting codec would "make room".
    snap = world([inst("codec", 4, last_used=0.0)], [member("codec", 4, "g"), member("lm", 10, "g")], gpus={"g0": 16})
    actions = decide(snap, 100.0)
    assert not evicted(actions)
    assert admits(actions) == {"g/codec": "g0", "g/lm": "g0"}


def test_a_group_that_can_never_fit_is_rejected_at_once_with_the_numbers() -> None:
    limits = replace(NO_MARGIN, margin_bytes=1 * GiB)
    snap = world(pending=[member("codec", 7, "g"), member("lm", 9, "g")], gpus={"g0": 16}, limits=limits)
    actions = decide(snap, 0.0)
    reasons = rejects(actions)
    assert set(reasons) == {"g/codec", "g/lm"} and not admits(actions) and not waits(actions)
    reason = reasons["g/lm"]
    assert "'codec' (7.0 GiB)" in reason and "'lm' (9.0 GiB)" in reason and "16.0 GiB on g0" in reason
    assert "16.0 GiB total, 1.0 GiB margin" in reason and "alternate: true" in reason


def test_pinned_models_count_against_the_groups_capacity() -> None:
    snap = world([inst("pinned", 8, pinned=True)], [member("codec", 4, "g"), member("lm", 6, "g")], gpus={"g0": 16})
    assert "8.0 GiB pinned" in rejects(decide(snap, 0.0))["g/codec"]


def test_other_processes_make_a_group_wait_not_fail() -> None:
    snap = world(pending=[member("codec", 4, "g"), member("lm", 8, "g")], gpus={"g0": 16}, external={"g0": 6})
    actions = decide(snap, 0.0)
    assert not rejects(actions) and set(waits(actions)) == {"g/codec", "g/lm"}


def test_evictions_for_all_members_are_planned_together_then_every_member_waits() -> None:
    idle = [inst("old", 6, last_used=0.0), inst("older", 6, last_used=-10.0)]
    snap = world(idle, [member("codec", 4, "g"), member("lm", 6, "g")], gpus={"g0": 16})
    actions = decide(snap, 100.0)
    assert evicted(actions) == ["older"]  # 4 free + 6 freed = 10 = what both need: one eviction
    assert not admits(actions) and set(waits(actions)) == {"g/codec", "g/lm"}
    assert actions.index(next(a for a in actions if isinstance(a, Offload))) < actions.index(
        next(a for a in actions if isinstance(a, Wait))
    )


def test_a_group_takes_one_load_slot_per_gpu() -> None:
    limits = replace(NO_MARGIN, max_loads_per_gpu=1)
    snap = world(pending=[member("codec", 2, "g"), member("lm", 4, "g")], limits=limits)
    assert len(admits(decide(snap, 0.0))) == 2
    busy = world([inst("loading", 2, state=S.LOADING)], [member("codec", 2, "g"), member("lm", 4, "g")], limits=limits)
    assert not admits(decide(busy, 0.0))


def test_two_groups_competing_for_one_gpu_the_first_is_admitted_the_second_waits() -> None:
    pending = [
        member("a1", 5, "first", at=0.0), member("a2", 5, "first", at=0.0),
        member("b1", 5, "second", at=1.0), member("b2", 5, "second", at=1.0),
    ]
    actions = decide(world(pending=pending, gpus={"g0": 16}), 2.0)
    assert admits(actions) == {"first/a1": "g0", "first/a2": "g0"}
    assert set(waits(actions)) == {"second/b1", "second/b2"}


def test_a_waiting_group_holds_nothing_a_request_ahead_may_evict_its_resident_member() -> None:
    # The group (enqueued later) has its codec resident and waits for lm, which cannot fit.
    # A higher-priority single load ahead of it may evict the group's idle codec: no hold-and-wait.
    resident = inst("codec", 8, last_used=0.0)
    pending = [
        req("urgent", 12, priority=5, at=0.0),
        member("codec", 8, "g", at=1.0), member("lm", 20, "g", at=1.0),
    ]
    actions = decide(world([resident], pending, gpus={"g0": 16, "g1": 16}), 50.0)
    assert evicted(actions) == ["codec"] and "req-urgent" in waits(actions)


def test_a_waiting_groups_members_do_not_idle_out() -> None:
    resident = inst("codec", 2, last_used=0.0, idle=5.0)
    snap = world([resident], [member("codec", 2, "g")])
    assert not evicted(decide(snap, 100.0))


def test_the_same_instance_twice_in_a_group_is_rejected() -> None:
    pending = [member("lm", 2, "g"), replace(member("lm", 2, "g"), request_id="g/lm-again")]
    assert set(rejects(decide(world(pending=pending), 0.0))) == {"g/lm", "g/lm-again"}


def test_group_answers_do_not_depend_on_snapshot_order() -> None:
    pending = [member("b", 5, "g2", at=1.0), member("a", 5, "g1"), member("c", 5, "g2", at=1.0), member("d", 5, "g1")]
    snap = world(pending=pending, gpus={"g0": 16})
    assert decide(snap, 2.0) == decide(replace(snap, pending=tuple(reversed(snap.pending))), 2.0)
    assert all(isinstance(a, Admit) for a in decide(snap, 2.0) if a.request_id.startswith("g1/"))
