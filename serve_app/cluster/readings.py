"""GPU readings as the router keeps them: the last probe reading per GPU, corrected for what
the router itself knows happened since.

A probe reads every `probe_interval_s`, so right after an eviction its reading still shows the
evicted model; without the correction the policy would evict a second model for the same load.
Simulated GPUs (no NVML) are computed outright from the router's own accounting.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from serve_app.core.snapshot import GpuView


@dataclass
class GpuReading:
    view: GpuView
    read_at: float
    processes: list[tuple[int, int]] = field(default_factory=list)
    #: Bytes our replicas reported freeing on this GPU since this reading arrived.
    freed_since: int = 0


class GpuReadings:
    """The router's view of every GPU in the cluster, keyed by GPU UUID."""

    def __init__(self, simulated_external: Mapping[str, int]) -> None:
        self.gpus: dict[str, GpuReading] = {}
        self.host_budget: dict[str, int] = {}
        #: Bytes another process is pretended to use on a simulated GPU (tests, demos).
        self.external: dict[str, int] = dict(simulated_external)

    def report(self, node_id: str, readings: list[dict[str, Any]], host_budget: int, now: float) -> None:
        for r in readings:
            view = GpuView(
                uuid=r["uuid"], node=node_id, index=r["index"], total_bytes=r["total_bytes"],
                used_bytes=r["used_bytes"], free_bytes=r["free_bytes"], name=r.get("name", ""),
                simulated=r.get("simulated", False),
            )
            self.gpus[r["uuid"]] = GpuReading(view, now, list(r.get("processes", [])))
        self.host_budget[node_id] = host_budget

    def freed(self, gpu: str | None, freed_bytes: int) -> None:
        """Our replica on `gpu` reported freeing `freed_bytes` (negative: it allocated)."""
        if freed_bytes > 0 and gpu in self.gpus:
            self.gpus[gpu].freed_since += freed_bytes

    def drop_node(self, node_id: str) -> None:
        for uuid_, reading in list(self.gpus.items()):
            if reading.view.node == node_id:
                del self.gpus[uuid_]

    def views(self, resident: Mapping[str, int]) -> list[GpuView]:
        """The GPUs as the policy should see them now, given our bytes `resident` per GPU.

        Simulated GPUs are computed from what the router accounts plus simulated external use:
        the router knows that truth first-hand, a probe's copy lags one interval. Real GPUs are
        the last NVML reading, less what our replicas reported freeing since it arrived.
        """
        views = []
        for reading in self.gpus.values():
            v = reading.view
            if v.simulated:
                used = min(v.total_bytes, resident.get(v.uuid, 0) + self.external.get(v.uuid, 0))
            else:
                used = max(0, v.used_bytes - reading.freed_since)
            views.append(replace(v, used_bytes=used, free_bytes=v.total_bytes - used))
        return sorted(views, key=lambda g: (g.node, g.index))
