"""One small actor per GPU node that reads its GPUs and reports them to the router.

NVML is node-local, so it has to be read on the node itself. Where NVML finds no GPU (CPU
machines, CI), the node's logical Ray GPUs are simulated with `SimulatedProbe`: used memory
is computed by the router itself (what it accounts plus any simulated external use): this
probe only reports which logical GPUs the node has and their size.

The router starts the probes; a probe finds the router by name (`names.lookup_router`), so
neither module imports the other.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from serve_app.cluster.names import lookup_router, probe_name
from serve_app.config import AppConfig

logger = logging.getLogger("serve_app.probe")


class NodeProbe:
    def __init__(self, node_id: str, app: dict[str, Any]) -> None:
        from serve_app.cluster.gpu import simulated_uuid
        from serve_app.cluster.probes import NvmlProbe, SimulatedProbe
        from serve_app.logs import configure_logging

        configure_logging()
        self.node_id = node_id
        self.config = AppConfig.model_validate(app)
        if NvmlProbe.available():
            self.probe: Any = NvmlProbe()
            logger.info("node %s: reading GPUs through NVML", node_id[:8])
        else:
            import ray

            count = 0
            for node in ray.nodes():
                if node["NodeID"] == node_id:
                    count = int(node.get("Resources", {}).get("GPU", 0))
            total = self.config.router.simulated_gpu_bytes
            self.probe = SimulatedProbe([(simulated_uuid(node_id, i), total) for i in range(count)])
            logger.info(
                "node %s: no NVIDIA GPU found (NVML unavailable); simulating %d GPUs of %.1f GiB",
                node_id[:8], count, total / 2**30,
            )
        self._task = asyncio.get_running_loop().create_task(self._loop())

    def host_budget_bytes(self) -> int:
        from serve_app.cluster.hostmem import host_budget_bytes, usable_bytes

        return host_budget_bytes(self.config.router.host_ram_budget_bytes, usable_bytes())

    async def _loop(self) -> None:
        router = None
        interval = self.config.router.probe_interval_s
        while True:
            try:
                if router is None:
                    router = await asyncio.to_thread(lookup_router, self.config.namespace)
                readings = [_reading_dict(r) for r in await asyncio.to_thread(self.probe.read)]
                await router.report_gpus.remote(self.node_id, readings, self.host_budget_bytes())
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.debug("probe report failed: %s", exc)
                router = None
            await asyncio.sleep(interval)

    def ping(self) -> str:
        return self.node_id


def _reading_dict(r: Any) -> dict[str, Any]:
    return {
        "uuid": r.uuid, "index": r.index, "name": r.name, "total_bytes": r.total_bytes,
        "used_bytes": r.used_bytes, "free_bytes": r.free_bytes,
        "processes": list(r.processes), "simulated": r.simulated,
    }


def start_probe(node_id: str, app: AppConfig) -> Any:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return (
        ray.remote(NodeProbe)
        .options(
            name=probe_name(node_id),
            namespace=app.namespace,
            lifetime="detached",
            get_if_exists=True,
            max_restarts=-1,
            num_cpus=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        )
        .remote(node_id, app.model_dump(mode="json"))
    )
