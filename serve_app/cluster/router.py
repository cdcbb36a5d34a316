"""The cluster VRAM router: one named Ray actor that sees every GPU and every replica.

It is a shell around the pure policy (`serve_app.core.policy.decide`), in three parts:

* `registry.py` keeps what replicas report and queues their commands (registration, commands);
* `readings.py` keeps what node probes read, corrected by what the router saw since (GPU readings);
* this module builds a `Snapshot`, runs the decision and carries out its actions (the decision
  loop): `Admit` answers a waiting load, `Offload`/`Release` become commands that the target
  replica picks up through its long-poll (see `link.py` for why long-polling), `Wait` records
  the reason shown in `/gpu/status` and in the 503 a request gets when it times out.

Its state is soft: everything is rebuilt from replicas re-registering after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, replace
from typing import Any

from serve_app.cluster import status as status_doc
from serve_app.cluster.journal import Journal
from serve_app.cluster.names import ROUTER_NAME
from serve_app.cluster.readings import GpuReadings
from serve_app.cluster.registry import ReplicaRecord, ReplicaRegistry
from serve_app.config import AppConfig
from serve_app.core.cost import DecayedRate, GapHistory
from serve_app.core.policy import decide, estimate_need_bytes, margin_bytes
from serve_app.core.snapshot import (
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
from serve_app.core.states import ModelState
from serve_app.core.trace import TraceRing

logger = logging.getLogger("serve_app.cluster.router")

__all__ = ["ROUTER_NAME", "Router", "get_or_create_router"]

S = ModelState


@dataclass
class _Pending:
    load: PendingLoad
    future: asyncio.Future[dict[str, Any]]
    reason: str = "queued"


class Router:
    """The router's logic over asyncio; `get_or_create_router` runs this class as a Ray actor."""

    def __init__(self, app: dict[str, Any], *, clock: Any = time.monotonic, start_loops: bool = True) -> None:
        from serve_app.logs import configure_logging

        configure_logging()
        self.config = AppConfig.model_validate(app)
        self.clock = clock
        rc = self.config.router
        self.limits = PolicyLimits(
            margin_fraction=rc.margin_fraction,
            margin_bytes=rc.margin_bytes,
            max_loads_per_gpu=rc.max_loads_per_gpu,
            max_models_per_gpu=rc.max_models_per_gpu,
            aging_s=rc.aging_s,
            cost_horizon_s=rc.cost_horizon_s,
            timeout_max_cost_s=rc.timeout_max_cost_s,
        )
        self.policies: dict[str, dict[str, Any]] = {
            m.id: {
                "idle_timeout_s": m.idle_timeout_s,
                "release_timeout_s": m.release_timeout_s,
                "offload_after_use": m.offload_after_use,
                "priority": m.priority,
                "pinned": m.pinned,
            }
            for m in self.config.models
        }
        self.readings = GpuReadings(rc.simulated_external_bytes)
        #: A GPU reading older than this many probe intervals is flagged stale in /gpu/status.
        self.stale_after_s = 3 * rc.probe_interval_s + 1.0
        self.registry = ReplicaRegistry(clock, self.readings.freed)
        self.pending: dict[str, _Pending] = {}
        #: Replica id -> until when it is held for a group admitted before its lease is taken.
        self.holds: dict[str, float] = {}
        self._wake = asyncio.Event()
        self.started_at = clock()
        self.ticks = 0
        #: Request arrivals and weight moves (`GET /gpu/trace`), and what the policy learns from them.
        self.trace = TraceRing(rc.trace_capacity)
        self.rates = DecayedRate(rc.rate_tau_s)
        self.gaps = GapHistory()  # per-model inter-arrival gaps: the predicted next use
        self.measured_s: dict[str, dict[str, float]] = {}  # model -> {"load"|"restore": last seconds}
        self._moves_seen: dict[str, dict[str, int]] = {}  # replica -> its lifecycle's move counters
        self._audit: tuple[float, dict[str, Any]] | None = None
        self._probes: dict[str, Any] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.metrics: Any = None
        self.journal = Journal()
        if start_loops:
            from serve_app.cluster.metrics import RouterMetrics

            self.metrics = RouterMetrics()
            self.journal.metrics = self.metrics
            self._tasks.append(asyncio.get_running_loop().create_task(self._tick_loop()))
            self._tasks.append(asyncio.get_running_loop().create_task(self._probe_loop()))
        logger.info("router started with %d configured models", len(self.config.models))

    @property
    def replicas(self) -> dict[str, ReplicaRecord]:
        return self.registry.replicas

    # --- registration and commands (called by replicas) -------------------------------------

    async def register(self, info: dict[str, Any]) -> dict[str, Any]:
        self._ingest(info)
        # Its move counters as of now: later increments are this trace's (a first load may finish
        # before the next tick looks).
        moves = info["status"].get("moves")
        if isinstance(moves, dict):
            self._moves_seen.setdefault(info["replica"], dict(moves))
        self.journal.transitions(info)
        self.registry.register(info)
        self._wake.set()
        return self.policies.get(info["model"], {})

    async def deregister(self, replica_id: str) -> None:
        if self.registry.remove(replica_id, "left") is not None:
            self._wake.set()

    async def heartbeat(self, info: dict[str, Any]) -> bool:
        self._ingest(info)
        self.journal.transitions(info)
        rec = self.replicas.get(info["replica"])
        if rec is None:
            return False
        old_state = rec.status.get("state")
        self.registry.update(rec, info)
        if info["status"].get("state") != old_state:
            self._wake.set()
        return True

    async def next_commands(self, replica_id: str, timeout_s: float) -> list[dict[str, Any]]:
        """Long-poll: return this replica's queued commands, or [] after `timeout_s`."""
        return await self.registry.next_commands(replica_id, timeout_s)

    async def command_done(self, replica_id: str, command_id: str, outcome: str, status: dict[str, Any]) -> None:
        self.registry.command_done(replica_id, command_id, outcome, status)
        self._wake.set()

    # --- admission ---------------------------------------------------------------------------

    async def admit(self, info: dict[str, Any], request_id: str, kind: str, timeout_s: float) -> dict[str, Any]:
        """Wait until the policy admits this load or restore, at most `timeout_s`."""
        self._ingest(info)
        rid = info["replica"]
        if rid not in self.replicas:
            await self.register(info)
        else:
            self.registry.update(self.replicas[rid], info)
        policy = self.policies.get(info["model"], {})
        rc = self.config.router
        need = self._need_bytes(info, kind)
        if not info.get("gpus"):
            return {"admitted": True, "gpu": None, "reason": "replica has no GPU"}
        load = PendingLoad(
            request_id=request_id,
            model=info["model"],
            replica=rid,
            node=info["node"],
            gpus=tuple(info["gpus"]),
            bytes_needed=need,
            priority=int(policy.get("priority", 0)),
            enqueued_at=self.clock(),
            kind=kind,
        )
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[request_id] = _Pending(load, fut)
        self._decide_and_act()
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout=timeout_s)
        except TimeoutError:
            pending = self.pending.pop(request_id, None)
            reason = pending.reason if pending else "timed out"
            return {"admitted": False, "reason": reason, "retry_after_s": max(1.0, rc.tick_s * 5)}
        finally:
            self.pending.pop(request_id, None)

    def _need_bytes(self, info: dict[str, Any], kind: str) -> int:
        status = info["status"]
        if kind == "resident":
            return int(status.get("bytes_gpu") or 0)
        if kind == "restore" and status.get("bytes_cpu"):
            return int(status["bytes_cpu"])
        rc = self.config.router
        measured = self.registry.measured_bytes(info["model"])
        return estimate_need_bytes(
            measured, info.get("declared_bytes"), info.get("weights_bytes"), rc.headroom_factor, rc.weights_factor
        ) or 0

    # --- joint admission (called by the members of a ManagedModel.use_models group) ----------

    async def admit_group(
        self, info: dict[str, Any], group: str, size: int, timeout_s: float
    ) -> dict[str, Any]:
        """Wait until the policy admits this member together with the rest of its group.

        Each member of the group asks from its own replica; the policy (`core/groups.py`) decides
        them as one once all `size` have asked. A group that can never fit is answered at once.
        """
        self._ingest(info)
        rid = info["replica"]
        if rid not in self.replicas:
            await self.register(info)
        else:
            self.registry.update(self.replicas[rid], info)
        policy = self.policies.get(info["model"], {})
        request_id = f"{group}/{rid}"
        load = self._member_load(
            PendingLoad(
                request_id=request_id, model=info["model"], replica=rid, node=info["node"],
                gpus=tuple(info.get("gpus") or ()), bytes_needed=0, priority=int(policy.get("priority", 0)),
                enqueued_at=self.clock(), kind="load", group=group, group_size=size,
            )
        )
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[request_id] = _Pending(load, fut)
        self._decide_and_act()
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout=timeout_s)
        except TimeoutError:
            pending = self.pending.pop(request_id, None)
            reason = pending.reason if pending else "timed out"
            return {"admitted": False, "reason": reason, "retry_after_s": max(1.0, self.config.router.tick_s * 5)}
        finally:
            self.pending.pop(request_id, None)

    def _member_load(self, load: PendingLoad) -> PendingLoad:
        """A group member's request as its replica stands now: it may have been evicted (or
        loaded by another request) while its group waited."""
        rec = self.replicas.get(load.replica)
        if rec is None:
            return load
        state = rec.status.get("state")
        kind = "resident" if state == S.GPU.value else "restore" if state == S.CPU.value else "load"
        return replace(load, kind=kind, bytes_needed=self._need_bytes(rec.info, kind))

    async def release_hold(self, info: dict[str, Any]) -> None:
        """The member took its lease: its in-flight count (in `info`, updated with the same call,
        so no heartbeat can lag behind) protects it from here on."""
        self._ingest(info)
        rec = self.replicas.get(info["replica"])
        if rec is not None:
            self.registry.update(rec, info)
        self.holds.pop(info["replica"], None)

    async def cancel_group(self, group: str) -> None:
        for pending in list(self.pending.values()):
            if pending.load.group == group and not pending.future.done():
                pending.future.set_result({"admitted": False, "reason": "another model of the group failed"})
        self._wake.set()

    # --- GPU readings (called by probes) -----------------------------------------------------

    async def report_gpus(self, node_id: str, readings: list[dict[str, Any]], host_budget: int) -> None:
        self.readings.report(node_id, readings, host_budget, self.clock())

    async def simulate_external(self, gpu: str, used_bytes: int) -> None:
        """Pretend another process uses `used_bytes` on simulated GPU `gpu` (tests, demos)."""
        self.readings.external[gpu] = used_bytes
        self._wake.set()

    async def _probe_loop(self) -> None:
        """Keep one probe actor on each node that has GPUs (nodes may join later)."""
        while True:
            try:
                await asyncio.to_thread(self._ensure_probes)
            except Exception:
                logger.warning("could not start node probes", exc_info=True)
            await asyncio.sleep(5.0)

    def _ensure_probes(self) -> None:
        import ray

        from serve_app.cluster.probe_actor import start_probe

        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("GPU", 0) > 0}
        for node_id in alive - set(self._probes):
            self._probes[node_id] = start_probe(node_id, self.config)
        for node_id in set(self._probes) - alive:
            self._probes.pop(node_id, None)
            self.readings.drop_node(node_id)

    # --- the decision loop -------------------------------------------------------------------

    async def _tick_loop(self) -> None:
        while True:
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.config.router.tick_s)
            try:
                self.registry.drop_stale(self.config.router.replica_timeout_s)
                self._decide_and_act()
                if self.metrics is not None:
                    self.metrics.observe(await self.status())
            except Exception:
                logger.exception("router tick failed")

    # --- the trace ring and the per-model statistics the policy reads -------------------------

    def _ingest(self, info: dict[str, Any]) -> None:
        """Record the requests a replica report carries (taken out of `info`, so once only)."""
        records = info.pop("requests", None)
        if not records:
            return
        now = self.clock()
        model = info["model"]
        size = self.registry.measured_bytes(model) or int(info.get("declared_bytes") or 0)
        for ago_s, held_s in records:
            at = now - float(ago_s)
            self.trace.add_request(at, model, size, float(held_s))
            self.rates.observe(model, at)
            self.gaps.observe(model, at)

    def _observe_moves(self) -> None:
        """Turn increments of each lifecycle's move counters into trace records with seconds."""
        now = self.clock()
        for rid, rec in self.replicas.items():
            st = rec.status
            counts = st.get("moves")
            if not isinstance(counts, dict):
                continue
            seen = self._moves_seen.get(rid)
            self._moves_seen[rid] = dict(counts)
            if seen is None:
                continue  # first report (or a router restart): its past is not this trace's
            size = int(st.get("bytes_gpu") or st.get("bytes_cpu") or 0) or self.registry.measured_bytes(rec.model) or 0
            for kind, count in counts.items():
                for _ in range(max(0, int(count) - int(seen.get(kind, 0)))):
                    seconds = float(st.get(f"last_{kind}_s") or 0.0)
                    self.trace.add_move(now - float(st.get("since_s") or 0.0) - seconds, rec.model, kind, seconds, size)
                    if kind in ("load", "restore"):
                        self.measured_s.setdefault(rec.model, {})[kind] = seconds
        for rid in set(self._moves_seen) - set(self.replicas):
            del self._moves_seen[rid]

    async def trace_csv(self) -> str:
        """The simulator's trace CSV (`bench/policy_sim.py --trace`) of the requests kept."""
        self._observe_moves()
        return self.trace.requests_csv()

    async def trace_models_csv(self) -> str:
        """The simulator's models CSV (`--models`): sizes and measured load/restore seconds."""
        self._observe_moves()
        return self.trace.models_csv(m.id for m in self.config.models if self.trace.model_bytes.get(m.id))

    def policy_audit(self, now: float, max_age_s: float = 5.0) -> dict[str, Any]:
        """`policy_audit` of /gpu/status: live GPU misses against Belady-Size's over the window.

        Recomputed at most every `max_age_s` (the tick loop reads the status every tick).
        """
        if self._audit is not None and now - self._audit[0] < max_age_s:
            return self._audit[1]
        usable = {g.uuid: max(0, g.total_bytes - margin_bytes(g, self.limits)) for g in self._gpu_views()}
        # Each model on the GPU of its (first) replica: Belady gets the same placement, not a pool.
        placed: dict[str, set[str]] = {}
        for _, rec in sorted(self.replicas.items()):
            if rec.gpu in usable and not any(rec.model in ms for ms in placed.values()):
                placed.setdefault(rec.gpu, set()).add(rec.model)
        groups = [(usable[gpu], models) for gpu, models in sorted(placed.items())]
        capacity = sum(usable.values())
        doc = self.trace.audit(now, self.config.router.audit_window_s, capacity, groups).as_dict()
        doc["capacity_bytes"] = sum(usable[gpu] for gpu in placed) if placed else capacity
        self._audit = (now, doc)
        return doc

    def _instances(self) -> list[InstanceView]:
        out = []
        now = self.clock()
        for rid, rec in self.replicas.items():
            st = rec.status
            state = ModelState(st["state"])
            bytes_gpu = int(st.get("bytes_gpu") or 0)
            if rec.reservation:
                if state in (S.UNLOADED, S.CPU):
                    state = S.LOADING if state is S.UNLOADED else S.RESTORING
                bytes_gpu = max(bytes_gpu, rec.reservation)
            policy = self.policies.get(rec.model, {})
            held = int(self.holds.get(rid, 0.0) > self.clock())  # admitted with a group, lease not yet taken
            out.append(
                InstanceView(
                    model=rec.model,
                    replica=rid,
                    node=rec.info["node"],
                    gpu=rec.gpu,
                    state=state,
                    bytes_gpu=bytes_gpu,
                    bytes_cpu=int(st.get("bytes_cpu") or 0),
                    last_used_at=self.clock() - float(st.get("idle_in_state_s") or 0.0),
                    # An open realtime session counts as use: never an eviction or idle offload under it.
                    in_flight=int(st.get("in_flight") or 0) + int(st.get("waiting") or 0) + held
                    + int(st.get("sessions") or 0),
                    priority=int(policy.get("priority", 0)),
                    idle_timeout_s=policy.get("idle_timeout_s"),
                    release_timeout_s=policy.get("release_timeout_s"),
                    offload_after_use=bool(policy.get("offload_after_use")),
                    pinned=bool(policy.get("pinned")),
                    request_rate_hz=self.rates.rate(rec.model, now),
                    load_s=self.measured_s.get(rec.model, {}).get("load", st.get("last_load_s")),
                    restore_s=self.measured_s.get(rec.model, {}).get("restore", st.get("last_restore_s")),
                    next_use_at=self.gaps.next_use_at(rec.model, now),
                )
            )
        return out

    def _gpu_views(self) -> list[GpuView]:
        return self.readings.views(self.registry.resident_bytes())

    def snapshot(self) -> Snapshot:
        return Snapshot(
            gpus=tuple(self._gpu_views()),
            instances=tuple(self._instances()),
            pending=tuple(
                p.load if p.load.group is None else self._member_load(p.load)
                for p in self.pending.values()
                if not p.future.done()
            ),
            host_budget_bytes=dict(self.readings.host_budget),
            limits=self.limits,
        )

    def _decide_and_act(self) -> None:
        self.ticks += 1
        self._observe_moves()
        snap = self.snapshot()
        for action in decide(snap, self.clock()):
            if isinstance(action, Admit):
                pending = self.pending.get(action.request_id)
                if pending is not None and not pending.future.done():
                    self.journal.decision(
                        "admit", action.model, action.replica, action.reason, request_id=action.request_id,
                        gpu=action.gpu, bytes=pending.load.bytes_needed, kind=pending.load.kind,
                    )
                self._admit(action)
            elif isinstance(action, Offload | Release):
                kind = "offload" if isinstance(action, Offload) else "release"
                rec = self.replicas.get(action.replica)
                if rec is not None and rec.command_outstanding is None:
                    self.registry.send(action.replica, kind, action.reason)
                    self.journal.decision(
                        "evict", action.model, action.replica, action.reason, gpu=rec.gpu,
                        bytes=int(rec.status.get("bytes_gpu") or 0), kind=kind,
                    )
                    if self.metrics is not None:
                        self.metrics.evictions.inc(1, {"model": action.model, "kind": kind})
            elif isinstance(action, Wait):
                pending = self.pending.get(action.request_id)
                if pending is not None:
                    pending.reason = action.reason
                    self.journal.decision(
                        "wait", action.model, action.replica, action.reason, request_id=action.request_id,
                        bytes=pending.load.bytes_needed,
                    )
            elif isinstance(action, Reject):
                pending = self.pending.pop(action.request_id, None)
                if pending is not None and not pending.future.done():
                    self.journal.decision("reject", action.model, action.replica, action.reason,
                                          request_id=action.request_id)
                    pending.future.set_result({"admitted": False, "never": True, "reason": action.reason})
        self.journal.forget(self.pending)

    def _admit(self, action: Admit) -> None:
        pending = self.pending.pop(action.request_id, None)
        if pending is None or pending.future.done():
            return
        rec = self.replicas.get(action.replica)
        load = self._member_load(pending.load) if pending.load.group is not None else pending.load
        if rec is not None and load.kind != "resident":
            rec.reservation = load.bytes_needed
            rec.reserved_seq = int(rec.status.get("seq", 0))
        if load.group is not None:
            # Held (counted as in use) until the member's lease is taken: nothing may evict it
            # between this answer and its lease. Bounded, in case the member never comes back.
            self.holds[action.replica] = self.clock() + self.config.router.request_timeout_s
            # A single request of the same replica may already be waiting here with the
            # lifecycle's one load in flight; the member's lease waits for that load. Admitting
            # it with the group lets that load go ahead (on the group's reservation).
            for rid, other in list(self.pending.items()):
                if other.load.replica == action.replica and other.load.group is None and not other.future.done():
                    self.pending.pop(rid, None)
                    other.future.set_result({"admitted": True, "gpu": action.gpu, "reason": "admitted with its group"})
        pending.future.set_result({"admitted": True, "gpu": action.gpu, "reason": action.reason, "kind": load.kind})
        if self.metrics is not None:
            tags = {"model": pending.load.model}
            self.metrics.admissions.inc(1, tags)
            self.metrics.admission_wait.observe(max(0.0, self.clock() - pending.load.enqueued_at), tags)

    # --- admin -------------------------------------------------------------------------------

    async def command(self, kind: str, model: str | None, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Send offload/release/policy to the replicas of `model` (all models when None)."""
        params = params or {}
        if kind == "policy":
            for model_id in [model] if model else list(self.policies):
                self.policies[model_id].update(params)
        targets = []
        for rid, rec in sorted(self.replicas.items()):
            if model is not None and rec.model != model:
                continue
            if kind == "offload" and model is None and (rec.status.get("state") != S.GPU.value):
                continue
            if kind == "policy":
                targets.append((rid, self.registry.send(rid, "policy", "admin", policy=self.policies[rec.model])))
            else:
                targets.append((rid, self.registry.send(rid, kind, "admin request")))
        results = []
        timeout = self.config.router.request_timeout_s
        for rid, fut in targets:
            try:
                results.append(await asyncio.wait_for(fut, timeout=timeout))
            except TimeoutError:
                results.append({"replica": rid, "outcome": f"no answer within {timeout:.0f}s", "state": None})
        self._wake.set()
        return [
            {"model": self.replicas[r["replica"]].model if r["replica"] in self.replicas else model, **r}
            for r in results
        ]

    async def status(self) -> dict[str, Any]:
        now = self.clock()
        instances = self._instances()
        resident = self.registry.resident_bytes()
        return {
            "gpus": status_doc.gpu_rows(
                self.readings, resident, instances, self.limits, now, stale_after_s=self.stale_after_s
            ),
            "models": status_doc.model_rows(self.replicas, self.policies, self.config),
            "queue": status_doc.queue_rows(((p.load, p.reason) for p in self.pending.values()), now),
            "router": {"ticks": self.ticks, "uptime_s": round(now - self.started_at, 1)},
            "policy_audit": self.policy_audit(now),
        }

    async def ping(self) -> bool:
        return True

    async def events(self, after_seq: int, timeout_s: float) -> dict[str, Any]:
        """Long-poll the event journal (`/gpu/events`): events after `after_seq`, waiting up to `timeout_s`."""
        return await self.journal.wait_since(after_seq, timeout_s)

    async def recent_events(self, model: str, since_wall: float) -> list[dict[str, Any]]:
        """`model`'s events since `since_wall` (time.time): what a slow request waited for."""
        return self.journal.recent(model, since_wall)


def get_or_create_router(app: AppConfig) -> Any:
    """The cluster's router actor, created on first use; restarted by Ray if it dies."""
    import ray

    actor_cls = ray.remote(Router)
    return actor_cls.options(
        name=ROUTER_NAME,
        namespace=app.namespace,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
        max_task_retries=0,
        max_concurrency=1000,
        num_cpus=0,
    ).remote(app.model_dump(mode="json"))
