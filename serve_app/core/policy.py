"""Placement policy: which pending load goes on which GPU, what gets evicted, what idles out.

`decide(snapshot, now)` is a pure function of plain data: no Ray, no torch, no clock. The
router builds a :class:`~serve_app.core.snapshot.Snapshot`, calls it, and carries out the actions;
tests call it with hand-made snapshots and a `now` of their choosing. Same input, same output:
every iteration below runs over a stably sorted sequence, so the order of tuples in the
snapshot does not matter.

One decision, in order:

1. **Account.** Free memory of a GPU is
   ``min(probe free - reservations of loads in flight, total - bytes we account) - margin``.
   The probe alone misses loads that were granted but have not allocated yet; our accounting
   alone misses other processes on the GPU. Taking the smaller never treats someone else's
   memory as free (Ollama's `updateFreeSpace` does the same). The plain
   ``min(probe free, total - accounted)`` was the first version: with another process using
   X bytes and a granted load not yet allocated, it over-commits by up to X. Subtracting the
   reservations counts a half-allocated load twice; that only makes its GPU look fuller
   until the load ends, and with `max_loads_per_gpu` = 1 (the default) nothing else is
   admitted there before then anyway.
2. **Idle transitions.** `gpu` instances idle past `idle_timeout_s` are offloaded (released
   when the node's host-RAM budget cannot take them); `cpu` instances idle past
   `release_timeout_s` are released. Pinned, busy and pending instances are left alone.
3. **Pending requests**, highest effective priority first (``priority + waited / aging_s``,
   so nothing starves), then earliest arrival, then request id:

   a. admit on the GPU where it fits with the least room left over (best fit), skipping GPUs
      with `max_loads_per_gpu` loads in flight or `max_models_per_gpu` resident models;
   b. if it fits only on a GPU whose loads are all taken, wait there and hold the bytes;
   c. otherwise plan evictions of idle, unpinned, not-higher-priority instances on the GPU
      that needs the fewest evicted bytes, and wait. It is not admitted in the same decision:
      the memory is not free until the offload has finished (and the probe has seen it),
      which is why Ollama waits for VRAM to recover after an unload. The GPU is reserved for
      this request for the rest of the decision;
   d. if even evicting everything allowed is not enough, wait with a reason that carries the
      numbers and a fix. Such a request reserves nothing, so smaller requests behind it can
      still be placed (backfill).

Actions come back in decision order: idle transitions first (sorted by node, GPU, model,
replica), then, per request in queue order, its evictions followed by its Admit or Wait.

Joint requests (`PendingLoad.group`) are decided as one, at the place of their first member,
by `serve_app/core/groups.py`: all admitted, all rejected, or all waiting.

Eviction eligibility compares the request's *base* priority, not its aged one: aging decides
who goes first, it must not let a long wait push out a model someone ranked higher.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from serve_app.core.cost import effective_rate_hz, eviction_cost_s, guess_load_s, guess_restore_s
from serve_app.core.groups import group_members, place_group
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
from serve_app.core.states import HOLDS_CPU, HOLDS_GPU, ModelState

__all__ = [
    "accounted_bytes",
    "decide",
    "effective_priority",
    "estimate_need_bytes",
    "eviction_order",
    "expected_cost_s",
    "gpu_free_bytes",
    "margin_bytes",
    "queue_order",
    "reload_s",
]

S = ModelState
GiB = 1024**3
MiB = 1024**2

_Key = tuple[str, str]  # (model, replica): one lifecycle
_PLACEABLE = frozenset({S.UNLOADED, S.CPU})  # states a pending load or restore starts from
_IN_FLIGHT_LOAD = frozenset({S.LOADING, S.RESTORING})


# --- helpers the router uses too ----------------------------------------------------------


def estimate_need_bytes(
    measured_bytes: int | None,
    declared_bytes: int | None,
    weights_bytes: int | None,
    headroom_factor: float,
    weights_factor: float,
) -> int | None:
    """GPU bytes to reserve for a load: the best evidence we have, with room to grow.

    A measured footprint (from an earlier load) beats a declared one, which beats the size of
    the weight files; measured and file sizes get a factor because activations and caches come
    on top. None means "unknown": the router must not admit blind.
    """
    if measured_bytes:
        return math.ceil(measured_bytes * headroom_factor)
    if declared_bytes:
        return int(declared_bytes)
    if weights_bytes:
        return math.ceil(weights_bytes * weights_factor)
    return None


def margin_bytes(gpu: GpuView, limits: PolicyLimits) -> int:
    """Bytes kept free on `gpu` for fragmentation and estimates that came out short."""
    return max(int(limits.margin_fraction * gpu.total_bytes), limits.margin_bytes)


def accounted_bytes(gpu_uuid: str, instances: Iterable[InstanceView]) -> int:
    """Bytes our instances hold or were promised on the GPU (reservations included)."""
    return sum(i.bytes_gpu for i in instances if i.gpu == gpu_uuid and i.state in HOLDS_GPU)


def gpu_free_bytes(gpu: GpuView, instances: Iterable[InstanceView], limits: PolicyLimits) -> int:
    """Free bytes after the margin, as `decide` sees them (never below 0 here; see module doc)."""
    accounted = reserved = 0
    for i in instances:
        if i.gpu == gpu.uuid and i.state in HOLDS_GPU:
            accounted += i.bytes_gpu
            if i.state in _IN_FLIGHT_LOAD:
                reserved += i.bytes_gpu
    return max(0, _free(gpu, accounted, reserved, margin_bytes(gpu, limits)))


def effective_priority(request: PendingLoad, now: float, aging_s: float) -> float:
    """Priority plus one per `aging_s` seconds waited, so low priority cannot starve."""
    if aging_s <= 0:
        return float(request.priority)
    return request.priority + max(0.0, now - request.enqueued_at) / aging_s


def queue_order(pending: Iterable[PendingLoad], now: float, aging_s: float) -> list[PendingLoad]:
    """Pending requests in the order `decide` considers them."""
    return sorted(
        pending,
        key=lambda p: (-effective_priority(p, now, aging_s), p.enqueued_at, p.request_id),
    )


def _free(gpu: GpuView, accounted: int, reserved: int, margin: int) -> int:
    # `reserved`: bytes granted to loads in flight, which the probe may not see yet.
    # Not clamped: a GPU over-committed by another process has negative room, and evicting
    # must first pay that back.
    return min(gpu.free_bytes - reserved, gpu.total_bytes - accounted) - margin


def _human(n: int) -> str:
    if abs(n) >= GiB:
        return f"{n / GiB:.1f} GiB"
    return f"{n / MiB:.0f} MiB"


def reload_s(inst: InstanceView, *, offloaded: bool) -> float:
    """Seconds the instance takes to come back: measured when it was, else guessed from its size."""
    size = inst.bytes_gpu or inst.bytes_cpu
    if offloaded:
        return inst.restore_s if inst.restore_s is not None else guess_restore_s(size)
    return inst.load_s if inst.load_s is not None else guess_load_s(size)


def expected_cost_s(inst: InstanceView, limits: PolicyLimits, now: float, *, offloaded: bool) -> float:
    """Expected reload seconds evicting `inst` causes (`serve_app/core/cost.py`).

    A release (the weights reload cold) is priced with the model's predicted next use from its
    gap history, ``1 / (next_use_at - now)`` as the rate, when the router knows one; an offload
    (a restore from the CPU tier) with the decayed rate capped by ``1/idle``, unless
    `limits.next_use_for_offloads`. See cost.py's doc for why each gets its own estimate.
    """
    if inst.next_use_at is not None and (not offloaded or limits.next_use_for_offloads):
        rate = 1.0 / max(inst.next_use_at - now, 1e-3)
    else:
        rate = effective_rate_hz(inst.request_rate_hz, now - inst.last_used_at)
    return eviction_cost_s(rate, reload_s(inst, offloaded=offloaded), limits.cost_horizon_s)


def eviction_order(
    inst: InstanceView, limits: PolicyLimits, host_free: int, now: float
) -> tuple[int, float, float, str, str]:
    """Lowest priority first (a hard rule), then least expected reload seconds per byte freed,
    then least recently used (which is all that is left when no rates are known)."""
    cost = expected_cost_s(inst, limits, now, offloaded=host_free >= inst.bytes_gpu)
    return (inst.priority, cost / max(inst.bytes_gpu, 1), inst.last_used_at, inst.replica, inst.model)


# --- the decision -------------------------------------------------------------------------


@dataclass(slots=True)
class _Gpu:
    """Working view of one GPU during one decision."""

    view: GpuView
    margin: int
    accounted: int = 0
    reserved: int = 0  # part of `accounted` granted to loads in flight
    free: int = 0  # after the margin; shrinks with admits and held bytes
    loads: int = 0  # loads/restores in flight plus admits made in this decision
    loading_s: float = 0.0  # the longest of the loads/restores in flight: at most this until one ends
    resident: int = 0  # instances holding GPU memory plus admits made in this decision
    freeing: int = 0  # bytes on their way out (offloading, or idle offloads planned here)
    freeing_count: int = 0
    evictable: list[InstanceView] = field(default_factory=list)
    reserved_for: str | None = None  # request id that claimed this GPU in this decision


@dataclass(slots=True)
class _Plan:
    gpu: _Gpu
    evict: list[InstanceView]
    freed: int  # bytes of `evict`
    available: int  # free + freeing + freed
    count_ok: bool
    cost: float = 0.0  # expected reload seconds of `evict`

    def sort_key(self) -> tuple[float, int, int, int, str]:
        return (self.cost, self.freed, len(self.evict), self.available, self.gpu.view.uuid)


class _Decision:
    def __init__(self, snapshot: Snapshot, now: float) -> None:
        self.now = now
        self.limits = limits = snapshot.limits
        self.pending_keys: set[_Key] = {(p.model, p.replica) for p in snapshot.pending if p.group is None}
        #: Members of joint requests: kept from idle timeouts, but evictable while their group
        #: waits, so a waiting group holds nothing (see `groups.py`).
        self.group_keys: set[_Key] = {(p.model, p.replica) for p in snapshot.pending if p.group is not None}
        # Looked up by uuid only; every walk over GPUs goes through sorted uuids (see _place).
        self.gpus: dict[str, _Gpu] = {g.uuid: _Gpu(g, margin_bytes(g, limits)) for g in snapshot.gpus}
        self.instances: dict[_Key, InstanceView] = {}
        self.chosen: set[_Key] = set()  # instances that already have an action
        self.placed: set[_Key] = set()  # instances whose pending request was handled
        self.actions: list[Action] = []

        #: Instances whose idle timeout has run out, found in the same pass (one pass matters
        #: at 64+ instances: the whole decision has a budget of well under a millisecond).
        self.expired: list[tuple[InstanceView, str]] = []
        host_held: dict[str, int] = {}
        self.largest_on_gpu: dict[str, int] = {}  # per node: what one offload may need on its host
        for inst in snapshot.instances:
            key = (inst.model, inst.replica)
            self.instances[key] = inst
            state = inst.state
            if (state is S.GPU or state is S.CPU) and not inst.pinned and inst.in_flight == 0:
                self._check_idle(inst, key)
            if state in HOLDS_CPU:
                host_held[inst.node] = host_held.get(inst.node, 0) + inst.bytes_cpu
            if state is S.GPU and inst.bytes_gpu > self.largest_on_gpu.get(inst.node, 0):
                self.largest_on_gpu[inst.node] = inst.bytes_gpu
            slot = self.gpus.get(inst.gpu) if inst.gpu is not None else None
            if slot is None or state not in HOLDS_GPU:
                continue
            slot.accounted += inst.bytes_gpu
            slot.resident += 1
            if state in _IN_FLIGHT_LOAD:
                slot.loads += 1
                slot.reserved += inst.bytes_gpu
                slot.loading_s = max(slot.loading_s, reload_s(inst, offloaded=state is S.RESTORING))
            elif state is S.OFFLOADING:
                slot.freeing += inst.bytes_gpu
                slot.freeing_count += 1
            elif inst.in_flight == 0 and not inst.pinned and key not in self.pending_keys:
                slot.evictable.append(inst)
        budgets = snapshot.host_budget_bytes
        self.host_free: dict[str, int] = {
            node: budgets.get(node, 0) - host_held.get(node, 0) for node in budgets.keys() | host_held.keys()
        }
        host_free = self.host_free
        for slot in self.gpus.values():
            slot.free = _free(slot.view, slot.accounted, slot.reserved, slot.margin)
            slot.evictable.sort(key=lambda i: eviction_order(i, limits, host_free.get(i.node, 0), now))

    # --- evictions -----------------------------------------------------------------------

    def _evict(self, inst: InstanceView, reason: str) -> Offload | Release:
        """Offload while the node's host-RAM budget allows, else release (the weights reload).

        When the budget is short, releasing colder CPU-tier copies to make room is chosen if
        their expected extra reload seconds plus this model's restore cost less than this
        model's cold load; those releases are appended to the actions ahead of the offload.
        """
        self.chosen.add((inst.model, inst.replica))
        host_free = self.host_free.get(inst.node, 0)
        if host_free < inst.bytes_gpu:
            for other in self._host_room(inst, inst.bytes_gpu - host_free):
                self.chosen.add((other.model, other.replica))
                self.actions.append(
                    Release(
                        other.model,
                        other.replica,
                        f"making host RAM room on {other.node} for offloading {inst.model!r}: its expected "
                        f"reload cost is lower ({reason})",
                    )
                )
                host_free += other.bytes_cpu
        if host_free >= inst.bytes_gpu:
            self.host_free[inst.node] = host_free - inst.bytes_gpu
            return Offload(inst.model, inst.replica, reason)
        self.host_free[inst.node] = host_free
        return Release(
            inst.model,
            inst.replica,
            f"{reason}; released, not offloaded: host RAM budget on {inst.node} has "
            f"{_human(max(host_free, 0))} left, offload needs {_human(inst.bytes_gpu)}",
        )

    def _host_room(self, inst: InstanceView, short: int) -> list[InstanceView]:
        """CPU-tier copies on `inst`'s node to release so that `inst` can be offloaded, or [] when
        releasing `inst` itself is expected to cost less (or nothing can make the room)."""
        limits, now = self.limits, self.now
        candidates = []
        for key, other in self.instances.items():
            if (
                other.state is not S.CPU
                or other.node != inst.node
                or other.pinned
                or other.in_flight
                or other.priority > inst.priority
                or key in self.chosen
                or key in self.pending_keys
                or key in self.group_keys
                or other.bytes_cpu <= 0
            ):
                continue
            extra = expected_cost_s(other, limits, now, offloaded=False)
            extra -= expected_cost_s(other, limits, now, offloaded=True)
            candidates.append((extra / other.bytes_cpu, other.last_used_at, other.replica, extra, other))
        candidates.sort(key=lambda c: c[:3])
        room, extra_total, chosen = 0, 0.0, []
        for _, _, _, extra, other in candidates:
            if room >= short:
                break
            chosen.append(other)
            room += other.bytes_cpu
            extra_total += extra
        if room < short:
            return []
        offload_cost = extra_total + expected_cost_s(inst, limits, now, offloaded=True)
        if offload_cost < expected_cost_s(inst, limits, now, offloaded=False):
            return chosen
        return []

    def _check_idle(self, inst: InstanceView, key: _Key) -> None:
        if key in self.pending_keys or key in self.group_keys:
            return  # about to be loaded or restored: not idle
        idle = self.now - inst.last_used_at
        if inst.state is S.GPU:
            timeout = inst.idle_timeout_s
            if timeout is not None and idle >= timeout:
                self.expired.append((inst, f"idle {idle:.1f}s >= idle_timeout_s {timeout}"))
        else:
            timeout = inst.release_timeout_s
            if timeout is not None and idle >= timeout:
                self.expired.append((inst, f"idle {idle:.1f}s >= release_timeout_s {timeout}"))

    def _keep_despite_timeout(self, inst: InstanceView) -> bool:
        """An expired timeout that would cost more than it frees is deferred (module doc, 2)."""
        limits = self.limits
        if limits.timeout_max_cost_s is None:
            return False
        if inst.state is S.CPU:
            # Host RAM within the budget is there for the tier: release a copy only when the
            # node's room is short of what an offload from one of its GPUs might need.
            room = self.host_free.get(inst.node, 0)
            return room >= self.largest_on_gpu.get(inst.node, 0)
        offloaded = self.host_free.get(inst.node, 0) >= inst.bytes_gpu
        return expected_cost_s(inst, limits, self.now, offloaded=offloaded) > limits.timeout_max_cost_s

    def idle_transitions(self) -> None:
        expired = [e for e in self.expired if not self._keep_despite_timeout(e[0])]
        expired.sort(key=lambda e: (e[0].node, e[0].gpu or "", e[0].model, e[0].replica))
        for inst, reason in expired:
            if inst.state is S.CPU:
                self.chosen.add((inst.model, inst.replica))
                self.actions.append(Release(inst.model, inst.replica, reason))
                continue
            self.actions.append(self._evict(inst, reason))
            slot = self.gpus.get(inst.gpu) if inst.gpu is not None else None
            if slot is not None:
                # On its way out: a request that needs these bytes waits for them instead of
                # evicting something else.
                slot.freeing += inst.bytes_gpu
                slot.freeing_count += 1

    def _plan(self, slot: _Gpu, request: PendingLoad, need: int) -> _Plan:
        """Evictions on `slot` that make room for `request`, cheapest (LRU, low priority) first."""
        cap = self.limits.max_models_per_gpu
        # Evictions needed so that one more model stays within max_models_per_gpu.
        excess = 0 if cap is None else slot.resident - slot.freeing_count - cap + 1
        available = slot.free + slot.freeing
        evict: list[InstanceView] = []
        freed = 0
        for inst in slot.evictable:
            if available + freed >= need and len(evict) >= excess:
                break
            if inst.priority > request.priority:
                break  # sorted by priority: everything after ranks higher too
            if (inst.model, inst.replica) in self.chosen:
                continue
            evict.append(inst)
            freed += inst.bytes_gpu
        if len(evict) > 1 and available + freed >= need:
            # Greedy by cost per byte can overshoot: a small cheap model taken first may turn out
            # unneeded once a large one was added. Keep only what the request still needs.
            for inst in reversed(evict.copy()):  # the dearest per byte first
                if len(evict) > excess and available + freed - inst.bytes_gpu >= need:
                    evict.remove(inst)
                    freed -= inst.bytes_gpu
        # Priced together: the host room one evictee's offload takes is gone for the next, which
        # then reloads cold (seed2, two 24 GiB GPUs + 64 GiB host: 21 -> 20 cold loads, 437 ->
        # 417 reload seconds, against pricing each evictee as if it had the room alone).
        room = dict(self.host_free)
        cost = 0.0
        for i in evict:
            offloaded = room.get(i.node, 0) >= i.bytes_gpu
            if offloaded:
                room[i.node] -= i.bytes_gpu
            cost += expected_cost_s(i, self.limits, self.now, offloaded=offloaded)
        return _Plan(slot, evict, freed, available + freed, len(evict) >= excess, cost)

    # --- placement -----------------------------------------------------------------------

    def place(self, request: PendingLoad) -> None:
        key = (request.model, request.replica)
        self.actions.append(self._place(request, key))

    def _wait(self, request: PendingLoad, reason: str) -> Wait:
        return Wait(request.request_id, request.model, request.replica, reason)

    def _place(self, request: PendingLoad, key: _Key) -> Admit | Wait:
        if key in self.placed:
            return self._wait(request, "another request for the same instance is ahead of it")
        self.placed.add(key)
        inst = self.instances.get(key)
        if inst is not None and inst.state not in _PLACEABLE:
            return self._wait(request, f"the instance is {inst.state.value}; waiting for it to settle")

        need = request.bytes_needed
        slots = [self.gpus[u] for u in sorted(set(request.gpus)) if u in self.gpus]
        if not slots:
            return self._wait(
                request,
                f"none of its GPUs ({', '.join(request.gpus) or 'none'}) has a memory reading; "
                f"check the probe on node {request.node}",
            )
        open_slots = [s for s in slots if s.reserved_for is None]
        if not open_slots:
            holders = ", ".join(sorted({s.reserved_for or "" for s in slots}))
            return self._wait(request, f"its GPUs are being freed for higher-priority request(s) {holders}")

        limits = self.limits
        cap = limits.max_models_per_gpu
        best: _Gpu | None = None
        busy: _Gpu | None = None
        for s in open_slots:
            if s.free < need:
                continue
            if cap is not None and s.resident >= cap:
                continue  # needs an eviction to get under the cap: see _plan
            if s.loads >= limits.max_loads_per_gpu:
                if busy is None or s.free < busy.free:
                    busy = s
                continue
            if best is None or s.free < best.free:  # slots are in uuid order: ties keep the first
                best = s

        if best is not None:
            reason = f"fits on {best.view.uuid}: needs {_human(need)}, {_human(best.free)} free"
            best.free -= need
            best.loads += 1
            best.resident += 1
            return Admit(request.request_id, request.model, request.replica, best.view.uuid, reason)

        if busy is not None:
            # Fits once the load in flight is done; hold the bytes so lower-priority requests
            # cannot evict their way into them meanwhile.
            reason = (
                f"fits on {busy.view.uuid} ({_human(need)} of {_human(busy.free)} free) but "
                f"{busy.loads} load(s) are in flight there (max_loads_per_gpu="
                f"{limits.max_loads_per_gpu}); admitted when one finishes"
            )
            busy.free -= need
            return self._wait(request, reason)

        ready = [s for s in open_slots if s.loads < limits.max_loads_per_gpu]
        if not ready:
            # Evictions are chosen when a load slot frees, not now: the models' next uses are
            # better known by then, and nothing is evicted for a load that cannot start yet.
            # Measured (bench/policy_sim.py, one 48 GiB GPU, seeds 1/2/3): 198/247/71 cold loads
            # evicting at once, 177/216/67 evicting when the slot frees; p95 wait 36 -> 12 s.
            return self._wait(
                request,
                f"needs {_human(need)}; {len(slots)} GPU(s) already run max_loads_per_gpu="
                f"{limits.max_loads_per_gpu} load(s); evictions are chosen when one finishes",
            )
        plans = [self._plan(s, request, need) for s in ready]
        feasible = [p for p in plans if p.available >= need and p.count_ok]
        if feasible:
            plan = min(feasible, key=_Plan.sort_key)
            busy_slots = [s for s in open_slots if s.loads >= limits.max_loads_per_gpu]
            later = self._cheaper_once_loaded(busy_slots, request, need, plan)
            if later is not None:
                return self._wait(
                    request,
                    f"evicting on {later.gpu.view.uuid} once its load in flight ends (at most "
                    f"{later.gpu.loading_s:.1f}s) is expected to cost {later.cost:.1f}s of reloads, against "
                    f"{plan.cost:.1f}s on {plan.gpu.view.uuid} now",
                )
            return self._commit(request, need, plan)
        return self._wait(request, self._too_big(need, plans))

    def _cheaper_once_loaded(
        self, busy_slots: list[_Gpu], request: PendingLoad, need: int, plan: _Plan
    ) -> _Plan | None:
        """A plan on one of `busy_slots` (GPUs whose load slots are all taken) that beats `plan` by
        more than the wait for it.

        Only GPUs with a free load slot were planned; on two GPUs one of them is often busy with a
        restore of a fraction of a second while the other could only make room by evicting a large
        model, whose offload then needs host room that colder copies are released for. The wait is
        priced at the longest load in flight there, in the same seconds as a reload. Measured
        (bench/policy_sim.py, two 24 GiB GPUs, 64 GiB host, seeds 1-8 of `bench/policy_trace.py`):
        seed6 16 -> 15 cold loads and 262.5 -> 243.3 reload seconds (LRU by bytes: 243.6), seed5
        1856.6 -> 1837.8, the other six unchanged. Pricing the wait at 0 or 0.3x made seed6 worse
        (16 cold loads, 265.2 s), at 2x or 4x the same as 1x.
        """
        if plan.cost <= 0:
            return None
        best: _Plan | None = None
        best_s = plan.cost  # reload seconds plus the wait; a busy GPU's plan must beat this
        for s in busy_slots:
            if s.loading_s <= 0:  # busy only with admits made in this decision: no known end
                continue
            p = self._plan(s, request, need)
            if p.available >= need and p.count_ok and p.cost + s.loading_s < best_s:
                best, best_s = p, p.cost + s.loading_s
        return best

    def _commit(self, request: PendingLoad, need: int, plan: _Plan) -> Wait:
        slot = plan.gpu
        uuid = slot.view.uuid
        for inst in plan.evict:
            idle = self.now - inst.last_used_at
            self.actions.append(
                self._evict(
                    inst,
                    f"making room for {request.model!r} (request {request.request_id}, priority "
                    f"{request.priority}) on {uuid}: idle {idle:.1f}s, priority {inst.priority}",
                )
            )
        coming = slot.freeing + plan.freed
        slot.reserved_for = request.request_id
        slot.freeing = 0
        slot.freeing_count = 0
        return self._wait(
            request,
            f"needs {_human(need)}, {_human(max(slot.free, 0))} free on {uuid}; waiting for "
            f"{_human(coming)} to be freed there ({len(plan.evict)} idle model(s) evicted now)",
        )

    def _too_big(self, need: int, plans: list[_Plan]) -> str:
        plan = max(plans, key=lambda p: (p.available, p.count_ok, p.gpu.view.uuid))
        slot = plan.gpu
        uuid = slot.view.uuid
        if plan.available >= need and not plan.count_ok:
            return (
                f"{uuid} holds {slot.resident} models (max_models_per_gpu="
                f"{self.limits.max_models_per_gpu}) and only {len(plan.evict)} can be evicted "
                "(the rest are busy, pinned or of higher priority); raise max_models_per_gpu or "
                "unpin a model"
            )
        return (
            f"needs {_human(need)}, {_human(max(plan.available, 0))} free on {uuid} after "
            f"offloading {len(plan.evict)} idle model(s); lower the model's footprint or raise "
            "capacity (busy, pinned and higher-priority models stay)"
        )


def decide(snapshot: Snapshot, now: float) -> list[Action]:
    """Plan admissions, evictions and idle transitions for one tick (see the module doc)."""
    decision = _Decision(snapshot, now)
    decision.idle_transitions()
    groups = group_members(snapshot.pending)
    for request in queue_order(snapshot.pending, now, snapshot.limits.aging_s):
        if request.group is None:
            decision.place(request)
        elif request.group in groups:  # a group is decided once, at its first member's place
            decision.actions.extend(place_group(decision, groups.pop(request.group)))
    return decision.actions
