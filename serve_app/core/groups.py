"""Joint admission: requests that need several models resident at once, decided as one.

A pipeline's `use_models("codec", "lm")` makes every member replica ask the router with the
same group id (`PendingLoad.group`, `group_size`). `decide` hands the whole group to
:func:`place_group` at the queue position of its first member, and the group gets one answer:

1. **Not all members have asked yet**: every member waits (nothing is held).
2. **Can never fit** (no assignment of the members to their GPUs fits in
   ``total - margin - pinned models`` on each GPU, or in `max_models_per_gpu`): every member
   gets `Reject`, answered at once with the numbers (503), instead of a wait until timeout.
3. **Fits now**: every member is admitted in the same decision (members already on their GPU
   are admitted as they are, and the router holds them until their lease is taken). A group
   takes one load slot on each GPU it loads onto (`max_loads_per_gpu`): admitting its members
   one by one would hold one member's memory while waiting for the next.
4. **Fits after evictions**: evictions for all members are planned together, the GPUs are
   reserved for the group for the rest of the decision, and every member waits.
5. Otherwise every member waits with the numbers.

No hold-and-wait: a waiting group holds nothing. Its members already on a GPU are protected
from idle timeouts and from its own evictions, but a request ahead of it in the queue may evict
them (they are restored when the group is admitted). Groups are decided in queue order, each
atomically, so two groups cannot each hold what the other waits for: that is the deadlock
this module exists to rule out.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import replace
from typing import TYPE_CHECKING

from serve_app.core.snapshot import Action, Admit, PendingLoad, Reject, Wait
from serve_app.core.states import HOLDS_GPU, ModelState

if TYPE_CHECKING:
    from serve_app.core.policy import _Decision, _Gpu, _Plan

S = ModelState
_PLACEABLE = frozenset({S.UNLOADED, S.CPU})
#: Enumerating assignments of members to GPUs is exponential; groups are a few models on a
#: few GPUs each (usually one: a replica's own). Beyond this many, only the first are tried.
MAX_ASSIGNMENTS = 4096


def group_members(pending: Iterable[PendingLoad]) -> dict[str, list[PendingLoad]]:
    """Pending requests by group id (requests without a group are left out)."""
    out: dict[str, list[PendingLoad]] = {}
    for p in pending:
        if p.group is not None:
            out.setdefault(p.group, []).append(p)
    return out


def _human(n: int) -> str:
    if abs(n) >= 1024**3:
        return f"{n / 1024**3:.1f} GiB"
    return f"{n / 1024**2:.0f} MiB"


def _names(members: Iterable[PendingLoad]) -> str:
    return ", ".join(f"{p.model!r} ({_human(p.bytes_needed)})" for p in members)


def place_group(d: _Decision, members: list[PendingLoad]) -> list[Action]:
    """The actions for one group: all Admit, all Reject, or evictions then all Wait."""
    members = sorted(members, key=lambda p: (p.model, p.replica, p.request_id))
    size = max(p.group_size for p in members)

    def wait_all(reason: str) -> list[Action]:
        return [Wait(p.request_id, p.model, p.replica, reason) for p in members]

    def reject_all(reason: str) -> list[Action]:
        return [Reject(p.request_id, p.model, p.replica, reason) for p in members]

    if len(members) < size:
        return wait_all(f"{len(members)} of its group's {size} models have asked; waiting for the rest")
    keys = [(p.model, p.replica) for p in members]
    if len(set(keys)) < len(keys):
        return reject_all("the group lists the same model instance twice; name each model once")
    if any(k in d.placed for k in keys):
        return wait_all("another request for one of its models is ahead of the group")
    if any(k in d.chosen for k in keys):
        return wait_all("one of its models is being moved for a request ahead of the group")

    resident: list[PendingLoad] = []
    to_place: list[PendingLoad] = []
    for p, key in zip(members, keys, strict=True):
        inst = d.instances.get(key)
        if not p.gpus or (inst is not None and inst.state is S.GPU):
            resident.append(p)
        elif inst is not None and inst.state not in _PLACEABLE:
            return wait_all(f"its model {p.model!r} is {inst.state.value}; waiting for it to settle")
        else:
            to_place.append(p)
    # Never evicted to make room for its own group, nor by anything behind it in this decision.
    d.chosen.update((p.model, p.replica) for p in resident)

    candidates = [[u for u in sorted(set(p.gpus)) if u in d.gpus] for p in to_place]
    for p, cands in zip(to_place, candidates, strict=True):
        if not cands:
            return wait_all(
                f"none of {p.model!r}'s GPUs ({', '.join(p.gpus)}) has a memory reading; "
                f"check the probe on node {p.node}"
            )
    assignments = list(itertools.islice(itertools.product(*candidates), MAX_ASSIGNMENTS))
    resident_on = _resident_bytes(d, resident)
    resident_count: dict[str, int] = {}
    for p in resident:
        inst = d.instances.get((p.model, p.replica))
        if inst is not None and inst.gpu is not None:
            resident_count[inst.gpu] = resident_count.get(inst.gpu, 0) + 1

    never = _never_fits(d, to_place, assignments, resident_on, resident_count)
    if never is not None:
        return reject_all(never)

    best = _fits_now(d, to_place, assignments, resident_on)
    if best is not None:
        # Only an admitted group claims its instances: a waiting one leaves them to the requests
        # behind it. A single request for a member behind it gets "another request is ahead";
        # the router answers it with the group's admission (one load serves both).
        d.placed.update(keys)
        actions: list[Action] = []
        per_slot: dict[str, list[PendingLoad]] = {}
        for p, uuid in zip(to_place, best, strict=True):
            per_slot.setdefault(uuid, []).append(p)
        for uuid, placed in sorted(per_slot.items()):
            slot = d.gpus[uuid]
            slot.free -= sum(p.bytes_needed for p in placed)
            slot.loads += 1
            slot.resident += len(placed)
        for p in members:
            if p in to_place:
                uuid = best[to_place.index(p)]
                actions.append(
                    Admit(p.request_id, p.model, p.replica, uuid, f"group fits: {_names(to_place)} on {uuid}")
                )
            else:
                inst = d.instances.get((p.model, p.replica))
                gpu = (inst.gpu if inst is not None else None) or ""
                actions.append(Admit(p.request_id, p.model, p.replica, gpu, "group fits; already resident, held"))
        return actions

    plan = _plan_evictions(d, to_place, assignments, resident_on)
    if plan is None:
        return wait_all(_short_reason(d, to_place, assignments, resident_on))
    assignment, plans = plan
    return _commit(d, members, to_place, assignment, plans)


def _resident_bytes(d: _Decision, resident: list[PendingLoad]) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in resident:
        inst = d.instances.get((p.model, p.replica))
        if inst is not None and inst.gpu is not None:
            out[inst.gpu] = out.get(inst.gpu, 0) + inst.bytes_gpu
    return out


def _per_slot(to_place: list[PendingLoad], assignment: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """uuid -> (bytes needed, models placed) for one assignment."""
    out: dict[str, tuple[int, int]] = {}
    for p, uuid in zip(to_place, assignment, strict=True):
        need, count = out.get(uuid, (0, 0))
        out[uuid] = (need + p.bytes_needed, count + 1)
    return out


def _capacity(d: _Decision, uuid: str, resident_on: dict[str, int]) -> tuple[int, int, int]:
    """(bytes the group may ever use on `uuid`, pinned bytes of other models, pinned count)."""
    slot = d.gpus[uuid]
    pinned = [
        i for i in d.instances.values()
        if i.gpu == uuid and i.pinned and i.state in HOLDS_GPU and (i.model, i.replica) not in d.chosen
    ]
    pinned_bytes = sum(i.bytes_gpu for i in pinned)
    return slot.view.total_bytes - slot.margin - pinned_bytes - resident_on.get(uuid, 0), pinned_bytes, len(pinned)


def _never_fits(
    d: _Decision,
    to_place: list[PendingLoad],
    assignments: list[tuple[str, ...]],
    resident_on: dict[str, int],
    resident_count: dict[str, int],
) -> str | None:
    cap = d.limits.max_models_per_gpu
    worst: tuple[int, str, int, int] | None = None  # (overflow, uuid, need, room)
    for assignment in assignments:
        ok = True
        for uuid, (need, count) in _per_slot(to_place, assignment).items():
            room, _, pinned_count = _capacity(d, uuid, resident_on)
            if need > room or (cap is not None and count + pinned_count + resident_count.get(uuid, 0) > cap):
                ok = False
                if worst is None or need - room < worst[0]:
                    worst = (need - room, uuid, need, room)
        if ok:
            return None
    if worst is None:  # nothing to place: the resident members fit as they are
        return None
    _, uuid, need, room = worst
    slot = d.gpus[uuid]
    _, pinned_bytes, _ = _capacity(d, uuid, resident_on)
    together = _names(to_place)
    if uuid in resident_on:
        together += f", with {_human(resident_on[uuid])} already resident,"
    return (
        f"the group can never be resident together: {together} need {_human(need + resident_on.get(uuid, 0))} "
        f"on {uuid}, which holds at most {_human(room + resident_on.get(uuid, 0))} for them "
        f"({_human(slot.view.total_bytes)} total, {_human(slot.margin)} margin, {_human(pinned_bytes)} pinned); "
        "set alternate: true on the pipeline to run its models one at a time, or give them GPUs of their own"
    )


def _fits_now(
    d: _Decision, to_place: list[PendingLoad], assignments: list[tuple[str, ...]], resident_on: dict[str, int]
) -> tuple[str, ...] | None:
    """The best-fit assignment that fits in free memory now, or None."""
    limits = d.limits
    best: tuple[int, tuple[str, ...]] | None = None
    for assignment in assignments:
        leftover = 0
        ok = True
        for uuid, (need, count) in _per_slot(to_place, assignment).items():
            slot = d.gpus[uuid]
            if (
                slot.reserved_for is not None
                or slot.free < need
                or slot.loads + 1 > limits.max_loads_per_gpu
                or (limits.max_models_per_gpu is not None and slot.resident + count > limits.max_models_per_gpu)
            ):
                ok = False
                break
            leftover += slot.free - need
        if ok and (best is None or leftover < best[0]):
            best = (leftover, assignment)
    return best[1] if best is not None else None


def _plan_evictions(
    d: _Decision, to_place: list[PendingLoad], assignments: list[tuple[str, ...]], resident_on: dict[str, int]
) -> tuple[tuple[str, ...], dict[str, _Plan]] | None:
    """The assignment needing the fewest evicted bytes, with its per-GPU plans, or None."""
    cap = d.limits.max_models_per_gpu
    # Eviction eligibility uses the group's lowest priority: no member may push out a model
    # ranked above itself.
    proxy = replace(to_place[0], priority=min(p.priority for p in to_place))
    best: tuple[tuple[int, int, tuple[str, ...]], tuple[str, ...], dict[str, _Plan]] | None = None
    for assignment in assignments:
        plans: dict[str, _Plan] = {}
        ok = True
        for uuid, (need, count) in sorted(_per_slot(to_place, assignment).items()):
            slot: _Gpu = d.gpus[uuid]
            if slot.reserved_for is not None:
                ok = False
                break
            plan = d._plan(slot, proxy, need)
            fits_count = cap is None or slot.resident - slot.freeing_count - len(plan.evict) + count <= cap
            if plan.available < need or not plan.count_ok or not fits_count:
                ok = False
                break
            plans[uuid] = plan
        if not ok:
            continue
        key = (sum(p.freed for p in plans.values()), sum(len(p.evict) for p in plans.values()), assignment)
        if best is None or key < best[0]:
            best = (key, assignment, plans)
    return (best[1], best[2]) if best is not None else None


def _commit(
    d: _Decision,
    members: list[PendingLoad],
    to_place: list[PendingLoad],
    assignment: tuple[str, ...],
    plans: dict[str, _Plan],
) -> list[Action]:
    group = members[0].group or ""
    need = {uuid: n for uuid, (n, _) in _per_slot(to_place, assignment).items()}
    coming = {uuid: d.gpus[uuid].freeing + plan.freed for uuid, plan in plans.items()}
    evicted = sum(len(p.evict) for p in plans.values())
    reason = "; ".join(
        f"needs {_human(need[u])} on {u}, {_human(max(d.gpus[u].free, 0))} free, waiting for "
        f"{_human(coming[u])} to be freed there"
        for u in sorted(plans)
    )
    reason = f"group of {len(members)}: {reason} ({evicted} idle model(s) evicted now)"
    actions: list[Action] = []
    done: set[str] = set()
    for p in members:
        # Each GPU's evictions come right before the Wait of the first member placed there. A GPU
        # that needs no eviction (the group waits for another of its GPUs) is neither reserved
        # nor held: requests behind may use it meanwhile, the group holds nothing while it waits.
        uuid = assignment[to_place.index(p)] if p in to_place else None
        if uuid is not None and uuid not in done and plans[uuid].evict:
            done.add(uuid)
            for inst in plans[uuid].evict:
                idle = d.now - inst.last_used_at
                actions.append(
                    d._evict(
                        inst,
                        f"making room for group {group} ({_names(to_place)}) on {uuid}: idle {idle:.1f}s, "
                        f"priority {inst.priority}",
                    )
                )
            slot = d.gpus[uuid]
            slot.reserved_for = group
            slot.freeing = 0
            slot.freeing_count = 0
        actions.append(Wait(p.request_id, p.model, p.replica, reason))
    return actions


def _short_reason(
    d: _Decision, to_place: list[PendingLoad], assignments: list[tuple[str, ...]], resident_on: dict[str, int]
) -> str:
    per = _per_slot(to_place, assignments[0]) if assignments else {}
    parts = []
    for uuid, (need, _) in sorted(per.items()):
        slot = d.gpus[uuid]
        held = f", held for request {slot.reserved_for}" if slot.reserved_for else ""
        room = _human(max(slot.free + slot.freeing, 0))
        parts.append(f"needs {_human(need)} on {uuid}, {room} free or freeing{held}")
    return (
        f"group ({_names(to_place)}): {'; '.join(parts) or 'nothing to place'}; waiting for room for all of them "
        "at once (busy, pinned and higher-priority models stay)"
    )
