"""The shared shell of every model deployment: lifecycle, leases, router link, commands.

A family module (`deployments/*.py`) subclasses :class:`ModelReplica`, says how to build its
adapter, and wraps each request's model work in `self.run(...)` (or `self.lifecycle.use()`),
so no family can forget the lease that keeps an offload away from a running request.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from serve_app.adapters import ModelAdapter
from serve_app.cluster.gpu import pick_device
from serve_app.cluster.link import RouterLink
from serve_app.config import AppConfig, ModelConfig
from serve_app.core.lifecycle import Lifecycle, LifecyclePolicy

logger = logging.getLogger("serve_app.cluster.replica")
T = TypeVar("T")


class ModelReplica:
    """Base class for the model deployments. Lazy: no weights are read in `__init__`."""

    #: Cores a family leaves to the request path when `cpu_threads` is not set (see `cpu_threads`).
    RESERVED_CORES = 0

    def __init__(self, model: dict[str, Any], app: dict[str, Any]) -> None:
        from serve_app.logs import configure_logging

        configure_logging()
        passive_openmp()
        self.config = ModelConfig.model_validate(model)
        self.app_config = AppConfig.model_validate(app)
        self.device = pick_device(self.config.device)
        self.cpu_threads = cpu_threads(self.config.cpu_threads, reserve=self.RESERVED_CORES)
        self.adapter = self.make_adapter()
        if self.config.fault_oom_at_bytes is not None:
            arm_simulated_oom(self.adapter, self.config.fault_oom_at_bytes)
        self.link = RouterLink.for_current_replica(self.config, self.app_config)
        self.lifecycle = Lifecycle(
            model=self.config.id,
            adapter=self.adapter,
            device=self.device,
            policy=LifecyclePolicy(
                idle_timeout_s=self.config.idle_timeout_s,
                release_timeout_s=self.config.release_timeout_s,
                offload_after_use=self.config.offload_after_use,
                priority=self.config.priority,
                pinned=self.config.pinned,
            ),
            admit=self.link.admit,
            on_event=self.link.on_transition,
            on_usage=self.link.on_usage,
            location=self.link.gpus[0] if self.link.gpus else None,
            need_bytes=self._expected_bytes,
        )
        self.link.attach(self.lifecycle, self.adapter, self.work_stats)
        self.link.start()

    def make_adapter(self) -> ModelAdapter:
        raise NotImplementedError

    def work_stats(self) -> dict[str, Any] | None:
        """Family counters shown as `work` in this replica's `/gpu/status` row (e.g. batching)."""
        return None

    def _expected_bytes(self) -> int | None:
        """For the load log line: the last measured footprint, else the declared, else the files' size."""
        measured = max(self.lifecycle.footprint.bytes_gpu, self.lifecycle.footprint.bytes_cpu)
        return measured or self.config.vram_bytes or self.adapter.weights_bytes()

    async def run(
        self, fn: Callable[..., T], *args: Any, arrivals: Sequence[float] | None = None, **kwargs: Any
    ) -> T:
        """Run blocking model work in a thread while holding a lease on the model. `arrivals`: the
        work is a batch of requests that arrived at these `lifecycle.clock()` times (the router's
        trace counts each)."""
        async with self.lifecycle.use(arrivals=arrivals):
            work = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
            try:
                return await asyncio.shield(work)
            except asyncio.CancelledError:
                # A thread cannot be stopped: keep the lease until it ends, so no offload or
                # release moves the weights under a forward pass still running.
                await asyncio.wait([work])
                raise

    # --- called through the Serve handle ----------------------------------------------------

    async def preheat(self) -> dict[str, Any]:
        """Load (or restore) the model without serving a request: `/gpu/load`."""
        await self.lifecycle.load("preheat")
        return self.replica_status()

    def replica_status(self) -> dict[str, Any]:
        return {
            **self.lifecycle.status(), "replica": self.link.replica_id, "node": self.link.node_id, "pid": os.getpid(),
            "last_load_fault": getattr(self.adapter, "last_load_fault", None),
        }

    def __del__(self) -> None:
        link = getattr(self, "link", None)
        if link is not None:
            link.stop()


def arm_simulated_oom(adapter: ModelAdapter, limit_bytes: int) -> None:
    """Arm the torch adapter's fault injection (the model's `fault_oom_at_bytes`)."""
    if not hasattr(adapter, "oom_at_bytes"):
        raise TypeError(f"fault_oom_at_bytes needs the torch adapter; this model uses {type(adapter).__name__}")
    adapter.oom_at_bytes = limit_bytes  # type: ignore[attr-defined]
    logger.warning("Fault injection armed: loads raise a simulated out-of-memory past %d bytes.", limit_bytes)


def passive_openmp() -> None:
    """Idle OpenMP threads sleep instead of spinning (read once, when torch first loads).

    torch's OpenMP workers spin after each parallel region by default, and on CPU that spin took
    the cores the proxy and ingress needed: the embeddings replica used 77 ms of CPU per request
    at 2 threads against 46 ms at 1. Passive, MiniLM's batch of one ran 18 ms on 2 threads for
    27 ms of CPU (1 thread: 20 ms), and a busy neighbour no longer made it several times slower.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def cpu_threads(configured: int | None, reserve: int = 0) -> int:
    """Threads for CPU inference: the configured count, else every core this process may use
    less `reserve` (at least one).

    Ray sets OMP_NUM_THREADS from a replica's `num_cpus` (1 below 2), and torch and CTranslate2
    both follow it: with the default 0.25 CPU, speech ran on one thread of two while
    single-model servers used both. A fractional `num_cpus` is a scheduling hint, not a cap.
    """
    if configured is not None:
        return configured
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, cores - reserve)
