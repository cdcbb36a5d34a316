"""Memory probes: what each GPU on a node holds, read without touching CUDA.

One interface, :class:`MemoryProbe`, two implementations picked at run time by
:func:`pick_probe`:

- :class:`NvmlProbe` reads NVML through `pynvml` (package nvidia-ml-py). NVML is the driver's
  management library: it sees every process on the GPU and needs no CUDA context. Asking
  torch instead (`torch.cuda.mem_get_info`) would create a context (~500 MiB per GPU and a
  process pinned to the device) in the router's node actor, so this module never imports torch.
- :class:`SimulatedProbe` stands in on machines without NVML (CI, laptops): logical GPUs of a
  configured size whose usage is what our lifecycles account plus a configurable amount
  "used by other processes", so the whole placement path runs without a GPU.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol, runtime_checkable

from serve_app.cluster.gpu import mig_handles

__all__ = [
    "GpuReading",
    "MemoryProbe",
    "NvmlProbe",
    "SimulatedProbe",
    "pick_probe",
    "simulated_gpu_ids",
]

logger = logging.getLogger("serve_app.cluster.probes")

GiB = 1024**3


@dataclass(frozen=True, slots=True)
class GpuReading:
    """One GPU as read at one moment."""

    uuid: str
    index: int
    name: str
    total_bytes: int
    used_bytes: int
    free_bytes: int
    #: (pid, bytes used on this GPU) per compute process, where the driver reports it.
    processes: tuple[tuple[int, int], ...] = ()
    simulated: bool = False


@runtime_checkable
class MemoryProbe(Protocol):
    def read(self) -> list[GpuReading]:
        """Read every GPU this probe covers, in index order (MIG instances one by one)."""
        ...


# --- NVML ---------------------------------------------------------------------------------

# nvmlInit is reference counted by the driver and costs a few ms: do it once per process (per
# pynvml module, so tests that inject a fake module get their own init).
_init_lock = threading.Lock()
_initialized: weakref.WeakSet[ModuleType] = weakref.WeakSet()


def _import_nvml() -> ModuleType:
    import pynvml  # lazy: absent or broken installs must not break importing this module

    return pynvml


def _ensure_init(nvml: ModuleType) -> None:
    with _init_lock:
        if nvml in _initialized:
            return
        nvml.nvmlInit()
        _initialized.add(nvml)


def _text(value: bytes | str) -> str:
    """pynvml before 11.5 returns bytes for names and UUIDs."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _unavailable_reason() -> str | None:
    """None when NVML works and sees at least one GPU, else why not (for the log line)."""
    try:
        nvml = _import_nvml()
    except ImportError as exc:
        return f"pynvml not importable: {exc}"
    try:
        _ensure_init(nvml)
        count = int(nvml.nvmlDeviceGetCount())
    except Exception as exc:  # NVMLError_LibraryNotFound / _DriverNotLoaded / OSError ...
        return f"{type(exc).__name__}: {exc}"
    if count == 0:
        return "NVML reports no GPUs"
    return None


class NvmlProbe:
    """Reads GPU memory through NVML; never creates a CUDA context."""

    def __init__(self, visible_indices: Sequence[int] | None = None) -> None:
        #: NVML indices (physical order, CUDA_VISIBLE_DEVICES does not apply) to report;
        #: None reports all.
        self.visible_indices = None if visible_indices is None else sorted(set(visible_indices))
        self._nvml: ModuleType | None = None

    @staticmethod
    def available() -> bool:
        """True when NVML loads and sees a GPU. False, not an exception, on machines without one."""
        return _unavailable_reason() is None

    def _lib(self) -> ModuleType:
        if self._nvml is None:
            nvml = _import_nvml()
            _ensure_init(nvml)
            self._nvml = nvml
        return self._nvml

    def read(self) -> list[GpuReading]:
        nvml = self._lib()
        count = int(nvml.nvmlDeviceGetCount())
        indices = range(count) if self.visible_indices is None else [i for i in self.visible_indices if i < count]
        readings = []
        for index in indices:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            # Under MIG a replica is given one instance: report each instance by its own UUID
            # and memory, not the whole GPU, so the router matches what replicas report.
            for h in mig_handles(nvml, handle) or [handle]:
                mem = nvml.nvmlDeviceGetMemoryInfo(h)
                readings.append(
                    GpuReading(
                        uuid=_text(nvml.nvmlDeviceGetUUID(h)),
                        index=index,
                        name=_text(nvml.nvmlDeviceGetName(h)),
                        total_bytes=int(mem.total),
                        used_bytes=int(mem.used),
                        free_bytes=int(mem.free),
                        processes=self._processes(nvml, h),
                    )
                )
        return readings

    @staticmethod
    def _processes(nvml: ModuleType, handle: Any) -> tuple[tuple[int, int], ...]:
        try:
            procs = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
        except nvml.NVMLError_NotSupported:
            return ()  # e.g. some vGPU / MIG setups; the GPU-wide used/free still counts them
        except nvml.NVMLError as exc:
            logger.debug("listing processes on a GPU failed: %s", exc)
            return ()
        # usedGpuMemory is None where the driver cannot attribute memory (WDDM, some
        # containers): 0 here, since the GPU-wide used/free already includes it.
        return tuple(sorted((int(p.pid), int(p.usedGpuMemory or 0)) for p in procs))


# --- simulation ---------------------------------------------------------------------------


def simulated_gpu_ids(node: str, count: int) -> list[str]:
    """Ids of a node's logical GPUs: unique across the cluster and obviously not NVML UUIDs."""
    return [f"sim-{node}-{i}" for i in range(count)]


class SimulatedProbe:
    """Logical GPUs: used = what our lifecycles account + what 'other processes' use.

    `accounted(uuid)` should return what NVML would see: bytes of models resident on that GPU
    (states gpu/offloading), not the reservations of loads still in flight. The policy
    subtracts those reservations from the probe's free bytes itself; counting them here too
    would make every load look twice its size until it finishes.
    """

    def __init__(
        self,
        gpus: Sequence[tuple[str, int]],
        accounted: Callable[[str], int] = lambda _uuid: 0,
        external: Mapping[str, int] | None = None,
        name: str = "Simulated GPU",
    ) -> None:
        self.gpus = [(uuid, int(total)) for uuid, total in gpus]
        self.accounted = accounted
        self.external: dict[str, int] = dict(external or {})
        self.name = name

    def set_external(self, uuid: str, used_bytes: int) -> None:
        """Pretend another process now uses `used_bytes` on `uuid` (tests, demos, admin API)."""
        self.external[uuid] = max(0, int(used_bytes))

    def read(self) -> list[GpuReading]:
        readings = []
        for index, (uuid, total) in enumerate(self.gpus):
            used = max(0, int(self.accounted(uuid))) + self.external.get(uuid, 0)
            used = min(used, total)  # a real GPU cannot report more used than it has
            readings.append(
                GpuReading(
                    uuid=uuid,
                    index=index,
                    name=self.name,
                    total_bytes=total,
                    used_bytes=used,
                    free_bytes=total - used,
                    simulated=True,
                )
            )
        return readings


def pick_probe(
    node: str,
    *,
    simulated_count: int = 1,
    simulated_total_bytes: int = 16 * GiB,
    accounted: Callable[[str], int] = lambda _uuid: 0,
    external: Mapping[str, int] | None = None,
    visible_indices: Sequence[int] | None = None,
    force_simulated: bool = False,
) -> MemoryProbe:
    """NVML when it works on this node, else `simulated_count` logical GPUs; logs which."""
    reason = "forced by configuration" if force_simulated else _unavailable_reason()
    if reason is None:
        probe = NvmlProbe(visible_indices)
        readings = probe.read()
        names = ", ".join(f"{r.index}: {r.name} {r.total_bytes / GiB:.1f} GiB" for r in readings)
        logger.info("Memory probe on %s: NVML, %d GPU(s) (%s).", node, len(readings), names)
        return probe
    ids = simulated_gpu_ids(node, simulated_count)
    logger.info(
        "Memory probe on %s: simulation, %d logical GPU(s) of %.1f GiB (%s).",
        node,
        simulated_count,
        simulated_total_bytes / GiB,
        reason,
    )
    return SimulatedProbe([(uuid, simulated_total_bytes) for uuid in ids], accounted, external)
