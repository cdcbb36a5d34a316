"""The `/gpu/status` document, built from the router's records: what the admin API, the
metrics and every operator surface read, so they always agree."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from serve_app.cluster.readings import GpuReadings
from serve_app.cluster.registry import ReplicaRecord
from serve_app.config import AppConfig
from serve_app.core.policy import gpu_free_bytes, margin_bytes
from serve_app.core.snapshot import InstanceView, PendingLoad, PolicyLimits
from serve_app.core.states import ModelState

_TIMINGS = ("last_load_s", "last_restore_s", "last_offload_s", "last_release_s")


def gpu_rows(
    readings: GpuReadings, resident: Mapping[str, int], instances: list[InstanceView], limits: PolicyLimits, now: float,
    stale_after_s: float | None = None,
) -> list[dict[str, Any]]:
    """One row per GPU; `stale` when its last reading is older than `stale_after_s` (a probe that
    died or lost the router: its numbers are then history, not the GPU's state)."""
    rows = []
    for g in readings.views(resident):
        reading = readings.gpus[g.uuid]
        rows.append(
            {
                "uuid": g.uuid, "index": g.index, "node": g.node, "name": g.name,
                "total_bytes": g.total_bytes, "used_bytes": g.used_bytes,
                "free_bytes": gpu_free_bytes(g, instances, limits),
                "margin_bytes": margin_bytes(g, limits), "simulated": g.simulated,
                "read_s_ago": round(now - reading.read_at, 3),
                "stale": stale_after_s is not None and now - reading.read_at > stale_after_s,
                # Per-process use as NVML reports it: our replicas and anything else on the GPU.
                "processes": [{"pid": pid, "used_bytes": used} for pid, used in reading.processes],
            }
        )
    return rows


def model_rows(
    replicas: Mapping[str, ReplicaRecord], policies: Mapping[str, dict[str, Any]], config: AppConfig
) -> list[dict[str, Any]]:
    """One row per replica, then one per configured model that has no replica now."""
    rows = []
    seen: set[str] = set()
    for rid, rec in sorted(replicas.items(), key=lambda kv: (kv[1].model, kv[0])):
        st, policy = rec.status, policies.get(rec.model, {})
        seen.add(rec.model)
        rows.append(
            {
                "model": rec.model, "replica": rid, "node": rec.info["node"], "gpu": rec.gpu,
                "state": st["state"], "reason": st.get("reason"), "since_s": st.get("since_s"),
                "device": st.get("device"),
                "bytes_gpu": st.get("bytes_gpu", 0), "bytes_cpu": st.get("bytes_cpu", 0),
                "in_flight": st.get("in_flight", 0), "idle_s": st.get("idle_s"),
                "sessions": st.get("sessions", 0),  # open realtime sessions holding this instance
                "idle_timeout_s": policy.get("idle_timeout_s"),
                "release_timeout_s": policy.get("release_timeout_s"),
                "offload_after_use": policy.get("offload_after_use"),
                "priority": policy.get("priority"), "pinned": policy.get("pinned"),
                **{k: st.get(k) for k in _TIMINGS},
                "last_error": st.get("last_error"), "loads": st.get("loads"),
                "work": st.get("work"),  # family counters: an embeddings replica's batches and texts
            }
        )
    for m in config.models:
        if m.id in seen:
            continue
        rows.append(
            {
                "model": m.id, "replica": None, "node": None, "gpu": None, "state": ModelState.UNLOADED.value,
                "reason": "no replica", "since_s": None, "device": None, "bytes_gpu": 0, "bytes_cpu": 0, "sessions": 0,
                "in_flight": 0, "idle_s": None, **policies[m.id], **dict.fromkeys(_TIMINGS), "last_error": None,
                "work": None,
            }
        )
    return rows


def queue_rows(pending: Iterable[tuple[PendingLoad, str]], now: float) -> list[dict[str, Any]]:
    """Waiting loads, oldest first, each with the reason the policy gave for the wait."""
    return [
        {
            "model": load.model, "replica": load.replica, "bytes": load.bytes_needed,
            "priority": load.priority, "waiting_s": round(now - load.enqueued_at, 3), "reason": reason,
            "group": load.group,  # joint requests (ManagedModel.use_models) share a group id
        }
        for load, reason in sorted(pending, key=lambda p: p[0].enqueued_at)
    ]
