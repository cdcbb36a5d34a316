"""The cluster VRAM router: one named Ray actor that sees every GPU and every replica.

It is a shell around the pure policy (`serve_app.policy.decide`): it keeps what replicas and
node probes report, builds a `Snapshot`, runs the decision, and carries out its actions:
`Admit` answers a waiting load, `Offload`/`Release` become commands that the target replica
picks up through its long-poll (see `router_link.py` for why long-polling), `Wait` records the
reason shown in `/gpu/status` and in the 503 a request gets when it times out.

Its state is soft: everything is rebuilt from replicas re-registering after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from serve_app.config import AppConfig
from serve_app.lifecycle_states import ModelState
from serve_app.snapshot import (
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

logger = logging.getLogger("serve_app.router")

ROUTER_NAME = "gpu-serve-router"
S = ModelState
RESIDENT = frozenset({S.GPU.value, S.OFFLOADING.value})


@dataclass
class _Replica:
    info: dict[str, Any]
    last_seen: float
    #: Bytes promised at admission, counted until the replica reports it moved past it.
    reservation: int = 0
    reserved_seq: int = -1
    commands: list[dict[str, Any]] = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    command_outstanding: str | None = None

    @property
    def status(self) -> dict[str, Any]:
        return self.info["status"]

    @property
    def model(self) -> str:
        return self.info["model"]


@dataclass
class _Pending:
    load: PendingLoad
    future: asyncio.Future[dict[str, Any]]
    reason: str = "queued"


@dataclass
class _GpuReading:
    view: GpuView
    read_at: float
    processes: list[tuple[int, int]] = field(default_factory=list)
    #: Bytes our replicas reported freeing on this GPU since this reading arrived. A probe reads
    #: every `probe_interval_s`, so right after an eviction its reading still shows the evicted
    #: model; without this the policy would evict a second model for the same load.
    freed_since: int = 0


class Router:
    """The router's logic over asyncio; `RouterActor` is this class as a Ray actor."""

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
        self.replicas: dict[str, _Replica] = {}
        self.gpus: dict[str, _GpuReading] = {}
        self.host_budget: dict[str, int] = {}
        self.external: dict[str, int] = dict(rc.simulated_external_bytes)
        self.pending: dict[str, _Pending] = {}
        self.results: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._wake = asyncio.Event()
        self.started_at = clock()
        self.ticks = 0
        self._probes: dict[str, Any] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.metrics: Any = None
        if start_loops:
            from serve_app.metrics import RouterMetrics

            self.metrics = RouterMetrics()
            self._tasks.append(asyncio.get_running_loop().create_task(self._tick_loop()))
            self._tasks.append(asyncio.get_running_loop().create_task(self._probe_loop()))
        logger.info("router started with %d configured models", len(self.config.models))

    # --- reports from replicas -------------------------------------------------------------

    async def register(self, info: dict[str, Any]) -> dict[str, Any]:
        rid = info["replica"]
        rec = self.replicas.get(rid)
        if rec is None:
            self.replicas[rid] = _Replica(info=info, last_seen=self.clock())
            logger.info("replica %s of model %r registered on node %s", rid, info["model"], info["node"][:8])
        else:
            self._update(rec, info)
        self._wake.set()
        return self.policies.get(info["model"], {})

    async def deregister(self, replica_id: str) -> None:
        rec = self.replicas.pop(replica_id, None)
        if rec is not None:
            self._freed(rec.info, int(rec.status.get("bytes_gpu") or 0))
            logger.info("replica %s of model %r left; dropped from accounting", replica_id, rec.model)
            self._wake.set()

    async def heartbeat(self, info: dict[str, Any]) -> bool:
        rec = self.replicas.get(info["replica"])
        if rec is None:
            return False
        old_state = rec.status.get("state")
        self._update(rec, info)
        if info["status"].get("state") != old_state:
            self._wake.set()
        return True

    def _update(self, rec: _Replica, info: dict[str, Any]) -> None:
        old_bytes = int(rec.status.get("bytes_gpu") or 0)
        rec.info = info
        rec.last_seen = self.clock()
        status = info["status"]
        self._freed(info, old_bytes - int(status.get("bytes_gpu") or 0))
        if rec.reservation and status.get("seq", 0) > rec.reserved_seq and status["state"] not in (
            S.LOADING.value, S.RESTORING.value
        ):
            rec.reservation = 0

    def _freed(self, info: dict[str, Any], freed: int) -> None:
        gpus = info.get("gpus")
        if freed > 0 and gpus and gpus[0] in self.gpus:
            self.gpus[gpus[0]].freed_since += freed

    async def next_commands(self, replica_id: str, timeout_s: float) -> list[dict[str, Any]]:
        """Long-poll: return this replica's queued commands, or [] after `timeout_s`."""
        rec = self.replicas.get(replica_id)
        if rec is None:
            await asyncio.sleep(min(timeout_s, 0.5))
            return []
        if not rec.commands:
            rec.wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(rec.wake.wait(), timeout=timeout_s)
        out, rec.commands = rec.commands, []
        return out

    async def command_done(self, replica_id: str, command_id: str, outcome: str, status: dict[str, Any]) -> None:
        rec = self.replicas.get(replica_id)
        if rec is not None:
            rec.command_outstanding = None
            self._update(rec, {**rec.info, "status": status})
        fut = self.results.pop(command_id, None)
        if fut is not None and not fut.done():
            fut.set_result({"replica": replica_id, "outcome": outcome, "state": status.get("state")})
        self._wake.set()

    # --- admission ---------------------------------------------------------------------------

    async def admit(self, info: dict[str, Any], request_id: str, kind: str, timeout_s: float) -> dict[str, Any]:
        """Wait until the policy admits this load or restore, at most `timeout_s`."""
        from serve_app.policy import estimate_need_bytes

        rid = info["replica"]
        if rid not in self.replicas:
            await self.register(info)
        else:
            self._update(self.replicas[rid], info)
        status = info["status"]
        policy = self.policies.get(info["model"], {})
        rc = self.config.router
        if kind == "restore" and status.get("bytes_cpu"):
            need = int(status["bytes_cpu"])
        else:
            measured = _measured(self, info["model"])
            need = estimate_need_bytes(
                measured, info.get("declared_bytes"), info.get("weights_bytes"), rc.headroom_factor, rc.weights_factor
            ) or 0
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

    # --- probes ------------------------------------------------------------------------------

    async def report_gpus(self, node_id: str, readings: list[dict[str, Any]], host_budget: int) -> None:
        now = self.clock()
        for r in readings:
            view = GpuView(
                uuid=r["uuid"], node=node_id, index=r["index"], total_bytes=r["total_bytes"],
                used_bytes=r["used_bytes"], free_bytes=r["free_bytes"], name=r.get("name", ""),
                simulated=r.get("simulated", False),
            )
            self.gpus[r["uuid"]] = _GpuReading(view, now, list(r.get("processes", [])))
        self.host_budget[node_id] = host_budget

    async def simulate_external(self, gpu: str, used_bytes: int) -> None:
        """Pretend another process uses `used_bytes` on simulated GPU `gpu` (tests, demos)."""
        self.external[gpu] = used_bytes
        self._wake.set()

    def _resident(self) -> dict[str, int]:
        """Bytes actually allocated per GPU, as NVML would see them: what simulated GPUs report used.

        Reservations of loads still in flight are left out; the policy adds those itself.
        """
        out: dict[str, int] = {}
        for rec in self.replicas.values():
            st, gpus = rec.status, rec.info.get("gpus")
            if gpus and st.get("state") in RESIDENT:
                out[gpus[0]] = out.get(gpus[0], 0) + int(st.get("bytes_gpu") or 0)
        return out

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

        from serve_app.probe_actor import start_probe

        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("GPU", 0) > 0}
        for node_id in alive - set(self._probes):
            self._probes[node_id] = start_probe(node_id, self.config)
        for node_id in set(self._probes) - alive:
            self._probes.pop(node_id, None)
            for uuid_, reading in list(self.gpus.items()):
                if reading.view.node == node_id:
                    del self.gpus[uuid_]

    # --- the decision loop -------------------------------------------------------------------

    async def _tick_loop(self) -> None:
        while True:
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.config.router.tick_s)
            try:
                self._drop_stale()
                self._decide_and_act()
                if self.metrics is not None:
                    self.metrics.observe(await self.status())
            except Exception:
                logger.exception("router tick failed")

    def _drop_stale(self) -> None:
        cutoff = self.clock() - self.config.router.replica_timeout_s
        for rid, rec in list(self.replicas.items()):
            if rec.last_seen < cutoff:
                logger.info("replica %s of model %r stopped reporting; dropped from accounting", rid, rec.model)
                self._freed(rec.info, int(rec.status.get("bytes_gpu") or 0))
                del self.replicas[rid]

    def _instances(self) -> list[InstanceView]:
        out = []
        for rid, rec in self.replicas.items():
            st = rec.status
            state = ModelState(st["state"])
            bytes_gpu = int(st.get("bytes_gpu") or 0)
            if rec.reservation:
                if state in (S.UNLOADED, S.CPU):
                    state = S.LOADING if state is S.UNLOADED else S.RESTORING
                bytes_gpu = max(bytes_gpu, rec.reservation)
            policy = self.policies.get(rec.model, {})
            out.append(
                InstanceView(
                    model=rec.model,
                    replica=rid,
                    node=rec.info["node"],
                    gpu=rec.info["gpus"][0] if rec.info.get("gpus") else None,
                    state=state,
                    bytes_gpu=bytes_gpu,
                    bytes_cpu=int(st.get("bytes_cpu") or 0),
                    last_used_at=self.clock() - float(st.get("idle_in_state_s") or 0.0),
                    in_flight=int(st.get("in_flight") or 0) + int(st.get("waiting") or 0),
                    priority=int(policy.get("priority", 0)),
                    idle_timeout_s=policy.get("idle_timeout_s"),
                    release_timeout_s=policy.get("release_timeout_s"),
                    offload_after_use=bool(policy.get("offload_after_use")),
                    pinned=bool(policy.get("pinned")),
                )
            )
        return out

    def _gpu_views(self) -> list[GpuView]:
        """The GPUs as the policy should see them now.

        Simulated GPUs are computed from what the router accounts plus simulated external use:
        the router knows that truth first-hand, a probe's copy lags one interval. Real GPUs are
        the last NVML reading, less what our replicas reported freeing since it arrived.
        """
        resident = self._resident()
        views = []
        for reading in self.gpus.values():
            v = reading.view
            if v.simulated:
                used = min(v.total_bytes, resident.get(v.uuid, 0) + self.external.get(v.uuid, 0))
            else:
                used = max(0, v.used_bytes - reading.freed_since)
            views.append(replace(v, used_bytes=used, free_bytes=v.total_bytes - used))
        return sorted(views, key=lambda g: (g.node, g.index))

    def snapshot(self) -> Snapshot:
        return Snapshot(
            gpus=tuple(self._gpu_views()),
            instances=tuple(self._instances()),
            pending=tuple(p.load for p in self.pending.values() if not p.future.done()),
            host_budget_bytes=dict(self.host_budget),
            limits=self.limits,
        )

    def _decide_and_act(self) -> None:
        from serve_app.policy import decide

        self.ticks += 1
        snap = self.snapshot()
        for action in decide(snap, self.clock()):
            if isinstance(action, Admit):
                self._admit(action)
            elif isinstance(action, Offload | Release):
                kind = "offload" if isinstance(action, Offload) else "release"
                rec = self.replicas.get(action.replica)
                if rec is not None and rec.command_outstanding is None:
                    self._send(action.replica, kind, action.reason)
                    if self.metrics is not None:
                        self.metrics.evictions.inc(1, {"model": action.model, "kind": kind})
            elif isinstance(action, Wait):
                pending = self.pending.get(action.request_id)
                if pending is not None:
                    pending.reason = action.reason

    def _admit(self, action: Admit) -> None:
        pending = self.pending.pop(action.request_id, None)
        if pending is None or pending.future.done():
            return
        rec = self.replicas.get(action.replica)
        if rec is not None:
            rec.reservation = pending.load.bytes_needed
            rec.reserved_seq = int(rec.status.get("seq", 0))
        pending.future.set_result({"admitted": True, "gpu": action.gpu, "reason": action.reason})
        if self.metrics is not None:
            tags = {"model": pending.load.model}
            self.metrics.admissions.inc(1, tags)
            self.metrics.admission_wait.observe(max(0.0, self.clock() - pending.load.enqueued_at), tags)

    def _send(self, replica_id: str, kind: str, reason: str, **extra: Any) -> asyncio.Future[dict[str, Any]]:
        rec = self.replicas[replica_id]
        command = {"id": uuid.uuid4().hex, "kind": kind, "reason": reason, **extra}
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.results[command["id"]] = fut
        if kind in ("offload", "release"):
            rec.command_outstanding = kind
        rec.commands.append(command)
        rec.wake.set()
        return fut

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
                targets.append((rid, self._send(rid, "policy", "admin", policy=self.policies[rec.model])))
            else:
                targets.append((rid, self._send(rid, kind, "admin request")))
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
        from serve_app.policy import gpu_free_bytes, margin_bytes

        now = self.clock()
        instances = self._instances()
        gpus = []
        for g in self._gpu_views():
            reading = self.gpus[g.uuid]
            gpus.append(
                {
                    "uuid": g.uuid, "index": g.index, "node": g.node, "name": g.name,
                    "total_bytes": g.total_bytes, "used_bytes": g.used_bytes,
                    "free_bytes": gpu_free_bytes(g, instances, self.limits),
                    "margin_bytes": margin_bytes(g, self.limits), "simulated": g.simulated,
                    "read_s_ago": round(now - reading.read_at, 3),
                    # Per-process use as NVML reports it: our replicas and anything else on the GPU.
                    "processes": [{"pid": pid, "used_bytes": used} for pid, used in reading.processes],
                }
            )
        models = []
        seen: set[str] = set()
        for rid, rec in sorted(self.replicas.items(), key=lambda kv: (kv[1].model, kv[0])):
            st, policy = rec.status, self.policies.get(rec.model, {})
            seen.add(rec.model)
            models.append(
                {
                    "model": rec.model, "replica": rid, "node": rec.info["node"],
                    "gpu": rec.info["gpus"][0] if rec.info.get("gpus") else None,
                    "state": st["state"], "reason": st.get("reason"), "since_s": st.get("since_s"),
                    "device": st.get("device"),
                    "bytes_gpu": st.get("bytes_gpu", 0), "bytes_cpu": st.get("bytes_cpu", 0),
                    "in_flight": st.get("in_flight", 0), "idle_s": st.get("idle_s"),
                    "idle_timeout_s": policy.get("idle_timeout_s"),
                    "release_timeout_s": policy.get("release_timeout_s"),
                    "offload_after_use": policy.get("offload_after_use"),
                    "priority": policy.get("priority"), "pinned": policy.get("pinned"),
                    "last_load_s": st.get("last_load_s"), "last_restore_s": st.get("last_restore_s"),
                    "last_offload_s": st.get("last_offload_s"), "last_release_s": st.get("last_release_s"),
                    "last_error": st.get("last_error"),
                }
            )
        for m in self.config.models:
            if m.id in seen:
                continue
            policy = self.policies[m.id]
            models.append(
                {
                    "model": m.id, "replica": None, "node": None, "gpu": None, "state": S.UNLOADED.value,
                    "reason": "no replica", "since_s": None, "device": None, "bytes_gpu": 0, "bytes_cpu": 0,
                    "in_flight": 0, "idle_s": None, **policy, "last_load_s": None, "last_restore_s": None,
                    "last_offload_s": None, "last_release_s": None, "last_error": None,
                }
            )
        queue = [
            {
                "model": p.load.model, "replica": p.load.replica, "bytes": p.load.bytes_needed,
                "priority": p.load.priority, "waiting_s": round(now - p.load.enqueued_at, 3), "reason": p.reason,
            }
            for p in sorted(self.pending.values(), key=lambda p: p.load.enqueued_at)
        ]
        router = {"ticks": self.ticks, "uptime_s": round(now - self.started_at, 1)}
        return {"gpus": gpus, "models": models, "queue": queue, "router": router}

    async def ping(self) -> bool:
        return True


def _measured(router: Router, model: str) -> int | None:
    """The largest footprint any replica of `model` measured after a load (shared knowledge)."""
    best = 0
    for rec in router.replicas.values():
        if rec.model == model:
            st = rec.status
            best = max(best, int(st.get("bytes_gpu") or 0), int(st.get("bytes_cpu") or 0))
    return best or None


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
