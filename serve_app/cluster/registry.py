"""The router's record of every replica: what each last reported, its admission reservation,
and the commands queued for its long-poll (see `link.py` for why replicas long-poll)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from serve_app.core.states import ModelState

logger = logging.getLogger("serve_app.cluster.router")

S = ModelState
#: States in which a replica's bytes are allocated on its GPU.
RESIDENT = frozenset({S.GPU.value, S.OFFLOADING.value})


@dataclass
class ReplicaRecord:
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

    @property
    def gpu(self) -> str | None:
        gpus = self.info.get("gpus")
        return gpus[0] if gpus else None


class ReplicaRegistry:
    """Replica records keyed by replica id; `on_freed(gpu, bytes)` hears of memory a replica gave back."""

    def __init__(self, clock: Callable[[], float], on_freed: Callable[[str | None, int], None]) -> None:
        self.clock = clock
        self.on_freed = on_freed
        self.replicas: dict[str, ReplicaRecord] = {}
        #: Command id -> the future its sender awaits.
        self.results: dict[str, asyncio.Future[dict[str, Any]]] = {}

    def register(self, info: dict[str, Any]) -> None:
        rid = info["replica"]
        rec = self.replicas.get(rid)
        if rec is None:
            self.replicas[rid] = ReplicaRecord(info=info, last_seen=self.clock())
            logger.info("replica %s of model %r registered on node %s", rid, info["model"], info["node"][:8])
        else:
            self.update(rec, info)

    def remove(self, replica_id: str, why: str) -> ReplicaRecord | None:
        rec = self.replicas.pop(replica_id, None)
        if rec is not None:
            self.on_freed(rec.gpu, int(rec.status.get("bytes_gpu") or 0))
            logger.info("replica %s of model %r %s; dropped from accounting", replica_id, rec.model, why)
        return rec

    def update(self, rec: ReplicaRecord, info: dict[str, Any]) -> None:
        old_bytes = int(rec.status.get("bytes_gpu") or 0)
        rec.info = info
        rec.last_seen = self.clock()
        status = info["status"]
        self.on_freed(rec.gpu, old_bytes - int(status.get("bytes_gpu") or 0))
        if rec.reservation and status.get("seq", 0) > rec.reserved_seq and status["state"] not in (
            S.LOADING.value, S.RESTORING.value
        ):
            rec.reservation = 0

    def drop_stale(self, timeout_s: float) -> None:
        cutoff = self.clock() - timeout_s
        for rid, rec in list(self.replicas.items()):
            if rec.last_seen < cutoff:
                self.remove(rid, "stopped reporting")

    def resident_bytes(self) -> dict[str, int]:
        """Bytes actually allocated per GPU, as NVML would see them.

        Reservations of loads still in flight are left out; the policy adds those itself.
        """
        out: dict[str, int] = {}
        for rec in self.replicas.values():
            if rec.gpu and rec.status.get("state") in RESIDENT:
                out[rec.gpu] = out.get(rec.gpu, 0) + int(rec.status.get("bytes_gpu") or 0)
        return out

    def measured_bytes(self, model: str) -> int | None:
        """The largest footprint any replica of `model` measured after a load (shared knowledge)."""
        best = 0
        for rec in self.replicas.values():
            if rec.model == model:
                st = rec.status
                best = max(best, int(st.get("bytes_gpu") or 0), int(st.get("bytes_cpu") or 0))
        return best or None

    # --- commands, delivered through each replica's long-poll ------------------------------

    def send(self, replica_id: str, kind: str, reason: str, **extra: Any) -> asyncio.Future[dict[str, Any]]:
        rec = self.replicas[replica_id]
        command = {"id": uuid.uuid4().hex, "kind": kind, "reason": reason, **extra}
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.results[command["id"]] = fut
        if kind in ("offload", "release"):
            rec.command_outstanding = kind
        rec.commands.append(command)
        rec.wake.set()
        return fut

    async def next_commands(self, replica_id: str, timeout_s: float) -> list[dict[str, Any]]:
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

    def command_done(self, replica_id: str, command_id: str, outcome: str, status: dict[str, Any]) -> None:
        rec = self.replicas.get(replica_id)
        if rec is not None:
            rec.command_outstanding = None
            self.update(rec, {**rec.info, "status": status})
        fut = self.results.pop(command_id, None)
        if fut is not None and not fut.done():
            fut.set_result({"replica": replica_id, "outcome": outcome, "state": status.get("state")})
