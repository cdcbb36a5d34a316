"""Stateful property test: `decide` driving a small simulated cluster.

What it explores (hypothesis `RuleBasedStateMachine`, 150 examples x up to 40 steps each):

- the world: 2-3 GPUs of 6-16 GiB spread over one or two nodes, read through
  `SimulatedProbe` (it sees loaded models plus 0-6 GiB used by "other processes", not the
  reservations of loads in flight, like NVML); 3-6 models of 0.25-6 GiB with priorities
  0-2, a quarter of them pinned, each allowed on a subset of its node's GPUs, with idle and
  release timeouts drawn from None and a few values, starting unloaded, on CPU or on a GPU;
  host-RAM budgets from 0 to 64 GiB; limits with 1-3 loads per GPU, an optional cap of 2-3
  models per GPU and aging of 10 or 30 s;
- the rules: requests arrive (served at once, held in flight, or queued as a pending load or
  restore), joint requests arrive (two or three models asked for as one group, whatever state
  they are in, like `ManagedModel.use_models`), requests complete, time advances (a router
  tick: decide), another process's usage on a GPU changes, an admin offloads or releases a
  model, loads/restores/offloads finish (an event: decide), and "apply decision". Deciding runs `decide` on a fresh
  snapshot, checks it, and applies its actions (Admit -> loading/restoring with the reserved
  bytes, Offload -> offloading, Release -> unloaded).

Checked on every decision: each pending request gets exactly one Admit, Wait or Reject; a
group's members all get the same kind of answer (all admitted together, all rejected, or all
waiting), and a rejected group truly cannot fit on its GPUs; no instance
gets two actions; nothing busy or pinned is offloaded or released; admits fit in
``min(probe free, total - accounted) - margin`` and, counting what other processes really use,
leave the margin free; they respect the loads-per-GPU and models-per-GPU limits; offloads fit
the node's host-RAM budget; evictions serve a request of at least their priority, come before
that request's Wait and are never followed by an admit on the GPU they free; the head of the
queue is admitted when it fits, and something is admitted or evicted whenever any request
fits on a GPU with nothing in flight; timeouts that ran out get their action; the output does
not depend on the snapshot's tuple order. Checked after every step: our accounted bytes plus
the margin never exceed a GPU's total, and only `gpu` instances are busy.

Run with ``--hypothesis-show-statistics`` to see how often each kind of decision came up.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from serve_app.cluster.probes import SimulatedProbe
from serve_app.core.policy import decide, estimate_need_bytes
from serve_app.core.snapshot import (
    Action,
    Admit,
    GpuView,
    InstanceView,
    Offload,
    PendingLoad,
    PolicyLimits,
    Reject,
    Release,
    Snapshot,
    Wait,
)
from serve_app.core.states import HOLDS_CPU, HOLDS_GPU, ModelState

S = ModelState
GiB = 1024**3
MiB = 1024**2
_MOVING = frozenset({S.LOADING, S.RESTORING, S.OFFLOADING})
_ALLOCATED = frozenset({S.GPU, S.OFFLOADING})
#: (model index, held open?): most requests finish at once, so models go idle and get evicted.
ARRIVAL = st.tuples(st.integers(0, 9), st.sampled_from([False, False, True]))


@dataclass
class Model:
    name: str
    size: int
    priority: int
    pinned: bool
    node: str
    gpus: tuple[str, ...]
    idle_timeout_s: float | None
    release_timeout_s: float | None


@dataclass
class Instance:
    state: S = S.UNLOADED
    gpu: str | None = None
    bytes_gpu: int = 0
    bytes_cpu: int = 0
    last_used_at: float = 0.0
    in_flight: int = 0
    waiting: int = 0  # requests queued until the model is on its GPU
    joint: int = 0  # admitted joint requests whose lease starts once the model is on its GPU
    measured: bool = False


class PolicyWorld(RuleBasedStateMachine):
    @initialize(data=st.data())
    def build(self, data: st.DataObject) -> None:
        self.now = 1000.0
        self.seq = 0
        n_gpus = data.draw(st.integers(2, 3), label="gpus")
        self.gpu_nodes: dict[str, str] = {}
        totals = []
        for i in range(n_gpus):
            uuid = f"sim-{i}"
            self.gpu_nodes[uuid] = "n0" if i == 0 else data.draw(st.sampled_from(["n0", "n1"]))
            totals.append((uuid, data.draw(st.integers(12, 32)) * 512 * MiB))
        self.totals = dict(totals)
        # Like NVML, the probe sees memory once it is allocated: not a load's reservation.
        external = {uuid: data.draw(st.sampled_from([0, 0, 1, 3])) * GiB for uuid, _ in totals}
        self.probe = SimulatedProbe(totals, accounted=self.allocated, external=external)
        nodes = sorted(set(self.gpu_nodes.values()))
        self.models: dict[str, Model] = {}
        for i in range(data.draw(st.integers(3, 6), label="models")):
            node = data.draw(st.sampled_from(nodes))
            own = [g for g, n in self.gpu_nodes.items() if n == node]
            gpus = data.draw(st.lists(st.sampled_from(own), min_size=1, max_size=len(own), unique=True))
            self.models[f"m{i}"] = Model(
                name=f"m{i}",
                size=data.draw(st.integers(1, 24)) * 256 * MiB,
                priority=data.draw(st.integers(0, 2)),
                pinned=data.draw(st.sampled_from([False, False, False, True])),
                node=node,
                gpus=tuple(gpus),
                idle_timeout_s=data.draw(st.sampled_from([None, 5.0, 30.0, 120.0])),
                release_timeout_s=data.draw(st.sampled_from([None, 60.0, 300.0])),
            )
        self.pending: dict[str, PendingLoad] = {}
        #: Joint requests' members by request id; recomputed from the instance at each snapshot,
        #: as the router does (a waiting member may be evicted or loaded meanwhile).
        self.joint: dict[str, PendingLoad] = {}
        self.host_budget = {n: data.draw(st.sampled_from([0, 2, 8, 64])) * GiB for n in nodes}
        self.limits = PolicyLimits(
            margin_fraction=0.05,
            margin_bytes=256 * MiB,
            max_loads_per_gpu=data.draw(st.integers(1, 3)),
            max_models_per_gpu=data.draw(st.sampled_from([None, 2, 3])),
            aging_s=data.draw(st.sampled_from([10.0, 30.0])),
        )
        # Start warm: hypothesis switches rules off per example (swarm testing), so a world
        # that starts empty would often never see a full GPU.
        self.instances = {}
        for name, m in self.models.items():
            inst = Instance(last_used_at=self.now - data.draw(st.sampled_from([0.0, 20.0, 100.0, 400.0])))
            self.instances[name] = inst
            where = data.draw(st.sampled_from(["unloaded", "cpu", *m.gpus]))
            if where == "cpu":
                inst.state, inst.bytes_cpu, inst.measured = S.CPU, m.size, True
            elif where != "unloaded" and self.room(where) >= m.size:
                inst.state, inst.gpu, inst.bytes_gpu, inst.measured = S.GPU, where, m.size, True
        self.arrive(data.draw(st.lists(ARRIVAL, max_size=4)))

    # --- the world ---------------------------------------------------------------------

    def accounted(self, uuid: str) -> int:
        return sum(i.bytes_gpu for i in self.instances.values() if i.gpu == uuid and i.state in HOLDS_GPU)

    def allocated(self, uuid: str) -> int:
        return sum(i.bytes_gpu for i in self.instances.values() if i.gpu == uuid and i.state in _ALLOCATED)

    def room(self, uuid: str) -> int:
        """What admits may still use on `uuid` before its margin, ignoring other processes."""
        return self.totals[uuid] - self.accounted(uuid) - margin(self.totals[uuid], self.limits)

    def arrive(self, arrivals: list[tuple[int, bool]]) -> None:
        """Each is served at once when resident (kept in flight when held), else queued for a load."""
        for i, hold in arrivals:
            m, inst = self.model(i)
            if inst.state is S.GPU:
                if hold:
                    inst.in_flight += 1
                else:
                    inst.last_used_at = self.now
            else:
                inst.waiting += 1
                self.enqueue_if_needed(m, inst)

    def model(self, index: int) -> tuple[Model, Instance]:
        name = sorted(self.models)[index % len(self.models)]
        return self.models[name], self.instances[name]

    def enqueue_if_needed(self, m: Model, inst: Instance) -> None:
        if inst.waiting == 0 or m.name in self.pending or inst.state not in (S.UNLOADED, S.CPU):
            return
        self.seq += 1
        need = estimate_need_bytes(m.size if inst.measured else None, None, m.size, 1.2, 1.3)
        assert need is not None
        self.pending[m.name] = PendingLoad(
            request_id=f"req-{self.seq:04d}",
            model=m.name,
            replica=f"r-{m.name}",
            node=m.node,
            gpus=m.gpus,
            bytes_needed=need,
            priority=m.priority,
            enqueued_at=self.now,
            kind="restore" if inst.state is S.CPU else "load",
        )

    def member_load(self, p: PendingLoad) -> PendingLoad:
        m, inst = self.models[p.model], self.instances[p.model]
        if inst.state is S.GPU:
            return replace(p, kind="resident", bytes_needed=inst.bytes_gpu)
        if inst.state is S.CPU:
            return replace(p, kind="restore", bytes_needed=inst.bytes_cpu)
        need = estimate_need_bytes(m.size if inst.measured else None, None, m.size, 1.2, 1.3)
        assert need is not None
        return replace(p, kind="load", bytes_needed=need)

    def snapshot(self) -> Snapshot:
        gpus = tuple(
            GpuView(
                r.uuid,
                self.gpu_nodes[r.uuid],
                r.index,
                r.total_bytes,
                r.used_bytes,
                r.free_bytes,
                r.name,
                True,
            )
            for r in self.probe.read()
        )
        instances = tuple(
            InstanceView(
                model=name,
                replica=f"r-{name}",
                node=m.node,
                gpu=inst.gpu,
                state=inst.state,
                bytes_gpu=inst.bytes_gpu,
                bytes_cpu=inst.bytes_cpu,
                last_used_at=inst.last_used_at,
                in_flight=inst.in_flight,
                priority=m.priority,
                idle_timeout_s=m.idle_timeout_s,
                release_timeout_s=m.release_timeout_s,
                pinned=m.pinned,
            )
            for name, m in sorted(self.models.items())
            for inst in [self.instances[name]]
        )
        pending = (*self.pending.values(), *(self.member_load(p) for p in self.joint.values()))
        return Snapshot(gpus, instances, pending, dict(self.host_budget), self.limits)

    # --- rules -------------------------------------------------------------------------

    @rule(arrivals=st.lists(ARRIVAL, min_size=1, max_size=4))
    def requests_arrive(self, arrivals: list[tuple[int, bool]]) -> None:
        self.arrive(arrivals)

    @rule(picks=st.lists(st.integers(0, 9), min_size=2, max_size=3, unique=True))
    def joint_request_arrives(self, picks: list[int]) -> None:
        """`use_models(a, b[, c])`: every member asks with one group id, whatever its state."""
        names = sorted({self.model(i)[0].name for i in picks})
        if len(names) < 2:
            return
        self.seq += 1
        group = f"grp-{self.seq:04d}"
        for name in names:
            m = self.models[name]
            rid = f"{group}/{name}"
            self.joint[rid] = PendingLoad(
                request_id=rid, model=name, replica=f"r-{name}", node=m.node, gpus=m.gpus,
                bytes_needed=0, priority=m.priority, enqueued_at=self.now, group=group, group_size=len(names),
            )

    @rule(i=st.integers(0, 9), count=st.integers(1, 3))
    def requests_complete(self, i: int, count: int) -> None:
        busy = [inst for _, inst in sorted(self.instances.items()) if inst.in_flight]
        for inst in busy[i % len(busy) :][:count] if busy else []:
            inst.in_flight -= 1
            inst.last_used_at = self.now

    @rule(
        dt=st.sampled_from([0.5, 3.0, 10.0, 40.0, 200.0]),
        arrivals=st.lists(ARRIVAL, max_size=2),
    )
    def time_advances(self, dt: float, arrivals: list[tuple[int, bool]]) -> None:
        """A router tick: time passes, some traffic comes in, then it decides."""
        self.now += dt
        self.arrive(arrivals)
        self.apply_decision()

    @rule(g=st.integers(0, 2), gib=st.sampled_from([0.0, 0.5, 2.0, 6.0]))
    def external_usage_changes(self, g: int, gib: float) -> None:
        uuid = sorted(self.totals)[g % len(self.totals)]
        self.probe.set_external(uuid, int(gib * GiB))

    @rule(i=st.integers(0, 9), op=st.sampled_from(["offload", "release"]))
    def admin_command(self, i: int, op: str) -> None:
        m, inst = self.model(i)
        if inst.in_flight or m.name in self.pending:
            return
        if op == "offload" and inst.state is S.GPU:
            inst.state, inst.bytes_cpu, inst.bytes_gpu = S.CPU, m.size, 0
        elif op == "release" and inst.state in (S.GPU, S.CPU):
            inst.state, inst.gpu, inst.bytes_gpu, inst.bytes_cpu = S.UNLOADED, None, 0, 0

    @rule(i=st.integers(0, 9), every=st.booleans())
    def transitions_finish(self, i: int, every: bool) -> None:
        """One (or every) load, restore or offload ends; the router decides on that event."""
        moving = [n for n, inst in sorted(self.instances.items()) if inst.state in _MOVING]
        if not moving:
            return
        for name in moving if every else [moving[i % len(moving)]]:
            m, inst = self.models[name], self.instances[name]
            if inst.state is S.OFFLOADING:
                inst.state, inst.bytes_gpu, inst.bytes_cpu = S.CPU, 0, m.size
                self.enqueue_if_needed(m, inst)
            else:  # the queued requests are served as soon as the model is resident
                inst.state, inst.bytes_gpu, inst.bytes_cpu, inst.measured = S.GPU, m.size, 0, True
                inst.waiting, inst.last_used_at = 0, self.now
                inst.in_flight += inst.joint  # admitted joint requests take their lease now
                inst.joint = 0
        self.apply_decision()

    @rule()
    def apply_decision(self) -> None:
        snap = self.snapshot()
        actions = decide(snap, self.now)
        check_decision(snap, self.now, actions)
        external = dict(self.probe.external)
        for action in actions:
            event(type(action).__name__)
            self.apply(action)
        for a in actions:
            if isinstance(a, Admit) and "already resident" not in a.reason:
                # External usage is stable within this step: admits must leave the margin free
                # (a resident group member allocates nothing new).
                total = self.totals[a.gpu]
                assert self.accounted(a.gpu) + external.get(a.gpu, 0) + margin(total, self.limits) <= total

    def apply(self, action: Action) -> None:
        if isinstance(action, Wait):
            return
        m = self.models[action.model]
        inst = self.instances[action.model]
        if isinstance(action, Reject):
            self.joint.pop(action.request_id)
            return
        if isinstance(action, Admit) and action.request_id in self.joint:
            request = self.member_load(self.joint.pop(action.request_id))
            if request.kind == "resident":
                inst.in_flight += 1  # the lease is taken at once
            else:
                inst.state = S.RESTORING if inst.state is S.CPU else S.LOADING
                inst.gpu, inst.bytes_gpu = action.gpu, request.bytes_needed
                inst.joint += 1
                # Like the router: a single request waiting on this instance is admitted with
                # the group (one load serves both; its requests are served once resident).
                self.pending.pop(action.model, None)
            return
        if isinstance(action, Admit):
            request = self.pending.pop(action.model)
            inst.state = S.RESTORING if inst.state is S.CPU else S.LOADING
            inst.gpu, inst.bytes_gpu = action.gpu, request.bytes_needed
        elif isinstance(action, Offload):
            inst.state = S.OFFLOADING
        elif isinstance(action, Release):
            inst.state, inst.gpu, inst.bytes_gpu, inst.bytes_cpu = S.UNLOADED, None, 0, 0
            self.enqueue_if_needed(m, inst)

    # --- invariants --------------------------------------------------------------------

    @invariant()
    def accounted_plus_margin_fits(self) -> None:
        for uuid, total in self.totals.items():
            assert self.accounted(uuid) + margin(total, self.limits) <= total

    @invariant()
    def only_resident_models_are_busy(self) -> None:
        for inst in self.instances.values():
            assert inst.in_flight == 0 or inst.state is S.GPU

    @invariant()
    def an_admitted_group_is_resident_together(self) -> None:
        """Members admitted jointly are never moved before their lease starts."""
        for inst in self.instances.values():
            assert inst.joint == 0 or inst.state in (S.LOADING, S.RESTORING)


def check_groups(snap: Snapshot, actions: list[Action]) -> None:
    """A group gets one kind of answer; a rejected group truly cannot fit; an admitted one fits."""
    members: dict[str, list[PendingLoad]] = {}
    for p in snap.pending:
        if p.group is not None:
            members.setdefault(p.group, []).append(p)
    answer = {a.request_id: type(a).__name__ for a in actions if isinstance(a, Admit | Wait | Reject)}
    by_key = {(i.model, i.replica): i for i in snap.instances}
    for group, ps in members.items():
        kinds = {answer[p.request_id] for p in ps}
        assert len(kinds) == 1, f"group {group} got mixed answers {kinds}"
        kind = kinds.pop()
        event(f"group {kind}")
        if kind == "Admit":
            assert len(ps) == ps[0].group_size
        if kind == "Reject" and len({(p.model, p.replica) for p in ps}) == len(ps):
            # Every member needing placement shares one GPU in this world when rejected? Check
            # independently: no way to put them on their GPUs within total - margin - pinned.
            to_place = [p for p in ps if by_key[(p.model, p.replica)].state is not S.GPU]
            assert not _fits_somewhere(snap, ps, to_place), f"group {group} rejected but it could fit"


def _fits_somewhere(snap: Snapshot, ps: list[PendingLoad], to_place: list[PendingLoad]) -> bool:
    import itertools

    gpus = {g.uuid: g for g in snap.gpus}
    keys = {(p.model, p.replica) for p in ps}
    for assignment in itertools.product(*[[u for u in p.gpus if u in gpus] for p in to_place]):
        ok = True
        for uuid in set(assignment):
            g = gpus[uuid]
            fixed = sum(
                i.bytes_gpu for i in snap.instances
                if i.gpu == uuid and i.state in HOLDS_GPU and (i.pinned or ((i.model, i.replica) in keys))
            )
            need = sum(p.bytes_needed for p, u in zip(to_place, assignment, strict=True) if u == uuid)
            if need + fixed > g.total_bytes - margin(g.total_bytes, snap.limits):
                ok = False
            # `max_models_per_gpu` is a hard cap too: members placed here plus what must stay.
            cap = snap.limits.max_models_per_gpu
            staying = sum(
                1 for i in snap.instances
                if i.gpu == uuid and i.state in HOLDS_GPU and (i.pinned or ((i.model, i.replica) in keys))
            )
            if cap is not None and assignment.count(uuid) + staying > cap:
                ok = False
        if ok:
            return True
    return False


def margin(total: int, limits: PolicyLimits) -> int:
    """The safety margin, computed here rather than with the policy's own helper."""
    return max(int(limits.margin_fraction * total), limits.margin_bytes)


def _queue_key(p: PendingLoad, now: float, aging_s: float) -> tuple[float, float, str]:
    return (-(p.priority + max(0.0, now - p.enqueued_at) / aging_s), p.enqueued_at, p.request_id)


def check_decision(snap: Snapshot, now: float, actions: list[Action]) -> None:
    """Everything a single decision must satisfy, computed independently of the policy."""
    limits = snap.limits
    gpus = {g.uuid: g for g in snap.gpus}
    by_key = {(i.model, i.replica): i for i in snap.instances}
    pending = {p.request_id: p for p in snap.pending}
    # Joint members are kept from idle timeouts, but are evictable while their group waits.
    protected_keys = {(p.model, p.replica) for p in snap.pending}
    pending_keys = {(p.model, p.replica) for p in snap.pending if p.group is None}

    # One Admit, Wait or Reject per pending request; at most one move or admit per instance.
    answered = [a.request_id for a in actions if isinstance(a, Admit | Wait | Reject)]
    assert sorted(answered) == sorted(pending)
    touched = [(a.model, a.replica) for a in actions if not isinstance(a, Wait | Reject)]
    assert len(touched) == len(set(touched))
    check_groups(snap, actions)

    # Nothing busy or pinned is moved; only idle timeouts or a request's eviction plan move things.
    expired: set[tuple[str, str]] = set()
    # A CPU copy's release timeout acts only when its node's host room is short of the largest
    # GPU-resident model there (the rule `timeout_max_cost_s` turns on); rates are 0 here, so
    # GPU idle timeouts always act.
    host_free = dict(snap.host_budget_bytes)
    largest: dict[str, int] = {}
    for i in snap.instances:
        if i.state in (S.CPU, S.RESTORING, S.OFFLOADING):
            host_free[i.node] = host_free.get(i.node, 0) - i.bytes_cpu
        if i.state is S.GPU:
            largest[i.node] = max(largest.get(i.node, 0), i.bytes_gpu)
    for key, i in by_key.items():
        if i.pinned or i.in_flight or key in protected_keys:
            continue
        idle = now - i.last_used_at
        if i.state is S.GPU and i.idle_timeout_s is not None and idle >= i.idle_timeout_s:
            expired.add(key)
        if i.state is S.CPU and i.release_timeout_s is not None and idle >= i.release_timeout_s:
            strict = limits.timeout_max_cost_s is None
            if strict or host_free.get(i.node, 0) < largest.get(i.node, 0):
                expired.add(key)
    moved = {(a.model, a.replica) for a in actions if isinstance(a, Offload | Release)}
    assert expired <= moved, "a timeout ran out without an action"
    offload_bytes: dict[str, int] = {}
    for a in actions:
        if isinstance(a, Offload | Release):
            i = by_key[(a.model, a.replica)]
            assert i.in_flight == 0 and not i.pinned and (a.model, a.replica) not in pending_keys
            assert i.state is S.GPU or (isinstance(a, Release) and i.state is S.CPU)
            if isinstance(a, Offload):
                offload_bytes[i.node] = offload_bytes.get(i.node, 0) + i.bytes_gpu
    for node, planned in offload_bytes.items():
        held = sum(i.bytes_cpu for i in snap.instances if i.node == node and i.state in HOLDS_CPU)
        assert planned <= snap.host_budget_bytes.get(node, 0) - held, "offloads overrun the host budget"

    # Admits fit, respect the load and model limits, and only use the request's GPUs.
    admitted: dict[str, int] = {}
    admit_count: dict[str, int] = {}
    load_slots: dict[str, set[str]] = {}  # a group takes one load slot per GPU it loads onto
    for a in actions:
        if isinstance(a, Admit):
            p = pending[a.request_id]
            assert a.gpu in p.gpus
            if p.kind == "resident":
                assert by_key[(a.model, a.replica)].state is S.GPU and by_key[(a.model, a.replica)].gpu == a.gpu
                continue
            admitted[a.gpu] = admitted.get(a.gpu, 0) + p.bytes_needed
            admit_count[a.gpu] = admit_count.get(a.gpu, 0) + 1
            load_slots.setdefault(a.gpu, set()).add(p.group or p.request_id)
    for uuid, need in admitted.items():
        g = gpus[uuid]
        on_gpu = [i for i in snap.instances if i.gpu == uuid and i.state in HOLDS_GPU]
        accounted = sum(i.bytes_gpu for i in on_gpu)
        assert need <= min(g.free_bytes, g.total_bytes - accounted) - margin(g.total_bytes, limits)
        loads = sum(i.state in (S.LOADING, S.RESTORING) for i in on_gpu)
        assert loads + len(load_slots[uuid]) <= limits.max_loads_per_gpu
        if limits.max_models_per_gpu is not None:
            assert len(on_gpu) + admit_count[uuid] <= limits.max_models_per_gpu

    # Evictions serve the Wait that follows them; no later admit lands on the GPU they free.
    buffered: list[InstanceView] = []
    reserved: set[str] = set()
    for a in actions:
        if isinstance(a, Offload | Release) and (a.model, a.replica) not in expired:
            buffered.append(by_key[(a.model, a.replica)])
        elif isinstance(a, Wait):
            p = pending[a.request_id]
            for victim in buffered:
                assert victim.priority <= p.priority, "evicted a higher-priority model"
                assert victim.gpu in p.gpus
                reserved.add(victim.gpu or "")
            if buffered:
                event("eviction plan")
            buffered = []
        elif isinstance(a, Admit):
            assert not buffered, "admitted in the same decision as its own evictions"
            assert a.gpu not in reserved, "admitted on a GPU freed for a higher-priority request"
    assert not buffered

    # Liveness: room on a GPU with nothing in flight means progress.
    freeing = {i.gpu for i in snap.instances if i.state is S.OFFLOADING}
    freeing |= {by_key[k].gpu for k in expired if by_key[k].state is S.GPU}

    def fits_now(p: PendingLoad, uuid: str) -> bool:
        if uuid not in gpus or uuid in freeing:
            return False
        on_gpu = [i for i in snap.instances if i.gpu == uuid and i.state in HOLDS_GPU]
        if any(i.state in (S.LOADING, S.RESTORING) for i in on_gpu):
            return False
        if limits.max_models_per_gpu is not None and len(on_gpu) >= limits.max_models_per_gpu:
            return False
        g = gpus[uuid]
        free = min(g.free_bytes, g.total_bytes - sum(i.bytes_gpu for i in on_gpu)) - margin(g.total_bytes, limits)
        return free >= p.bytes_needed

    # (Single requests only: a group's fit is checked by check_groups.)
    ordered = sorted(snap.pending, key=lambda p: _queue_key(p, now, limits.aging_s))
    admitted_ids = {a.request_id for a in actions if isinstance(a, Admit)}
    ordered = [p for p in ordered if p.group is None] if ordered and ordered[0].group is None else []
    if ordered and any(fits_now(ordered[0], u) for u in ordered[0].gpus):
        assert ordered[0].request_id in admitted_ids, "the head of the queue fits but was not admitted"
    if any(fits_now(p, u) for p in ordered for u in p.gpus):
        assert admitted_ids or reserved, "a request fits but nothing was admitted or evicted"
        event("something fit")
    for w in (a for a in actions if isinstance(a, Wait)):
        if "lower the model's footprint" in w.reason:
            event("too big")

    # Deterministic, whatever the order of the snapshot's tuples.
    rng = random.Random(len(actions))
    shuffled = replace(
        snap,
        gpus=tuple(rng.sample(snap.gpus, len(snap.gpus))),
        instances=tuple(rng.sample(snap.instances, len(snap.instances))),
        pending=tuple(rng.sample(snap.pending, len(snap.pending))),
    )
    assert decide(shuffled, now) == actions


PolicyWorld.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestPolicyWorld = PolicyWorld.TestCase
