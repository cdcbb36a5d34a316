"""The seam for side effects on the accelerator: CUDA and NVML questions asked by replicas.

Nothing here creates a CUDA context or imports torch: NVML answers "is there a GPU" cheaply,
and torch is only imported where a model loads.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

logger = logging.getLogger("serve_app.cluster.gpu")


def nvml_gpu_count() -> int:
    """GPUs NVML can see on this node; 0 when NVML (the NVIDIA driver) is absent."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return 0
    try:
        return int(pynvml.nvmlDeviceGetCount())
    except Exception:
        return 0


def visible_cuda_devices() -> list[str]:
    value = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return [v.strip() for v in value.split(",") if v.strip()]


def pick_device(requested: str = "auto") -> str:
    """The device a replica serves from: CUDA when it was given a real GPU, else the CPU.

    Ray sets CUDA_VISIBLE_DEVICES for replicas with `num_gpus`; with logical GPUs (no
    driver), NVML finds nothing and the model runs on the CPU.
    """
    if requested == "cpu":
        return "cpu"
    has_gpu = nvml_gpu_count() > 0 and bool(visible_cuda_devices())
    if requested == "cuda" and not has_gpu:
        raise RuntimeError(
            "device 'cuda' was requested but this replica has no NVIDIA GPU; "
            "set device: auto to fall back to the CPU"
        )
    return "cuda:0" if has_gpu else "cpu"


def simulated_uuid(node_id: str, index: int) -> str:
    """The id of logical GPU `index` on a node without NVML; the probe and replicas agree on it."""
    return f"sim-{node_id[:8]}-{index}"


# --- GPU identity: what this process calls cuda:N, as NVML UUIDs ---------------------------------
#
# Ray's GPU ids are the entries it writes into a replica's CUDA_VISIBLE_DEVICES: CUDA ordinals
# of the node (in CUDA's order, FASTEST_FIRST unless CUDA_DEVICE_ORDER=PCI_BUS_ID), or UUIDs
# when the node was started with UUIDs. NVML numbers GPUs in PCI bus order, so an ordinal passed
# to nvmlDeviceGetHandleByIndex names the wrong GPU on a node whose GPUs differ. The CUDA driver
# of this process (cuInit, no context) applies CUDA_VISIBLE_DEVICES and CUDA_DEVICE_ORDER exactly
# as torch and CTranslate2 will, so its UUIDs are asked first; the entries are resolved through
# NVML only when the driver cannot be asked.


@dataclass(frozen=True, slots=True)
class NvmlDevice:
    """A GPU or a MIG instance as NVML names it."""

    uuid: str  # "GPU-..." or "MIG-..."
    index: int  # NVML index of the physical GPU
    name: str
    parent_uuid: str | None = None  # the physical GPU of a MIG instance
    gpu_instance: int | None = None
    compute_instance: int | None = None

    @property
    def bare(self) -> str:
        """The UUID without its GPU-/MIG- prefix, as the CUDA driver reports it."""
        return self.uuid.split("-", 1)[1].lower() if self.uuid[:4] in ("GPU-", "MIG-") else self.uuid.lower()


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _import_nvml() -> ModuleType:
    import pynvml

    return pynvml


def nvml_devices(nvml: ModuleType | None = None) -> list[NvmlDevice]:
    """Every GPU NVML sees, with MIG instances listed after their GPU where MIG is on."""
    nvml = nvml or _import_nvml()
    nvml.nvmlInit()
    out = []
    for index in range(int(nvml.nvmlDeviceGetCount())):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        gpu = NvmlDevice(_text(nvml.nvmlDeviceGetUUID(handle)), index, _text(nvml.nvmlDeviceGetName(handle)))
        out.append(gpu)
        for mig in mig_handles(nvml, handle):
            out.append(
                NvmlDevice(
                    _text(nvml.nvmlDeviceGetUUID(mig)), index, _text(nvml.nvmlDeviceGetName(mig)), gpu.uuid,
                    _optional_int(nvml, "nvmlDeviceGetGpuInstanceId", mig),
                    _optional_int(nvml, "nvmlDeviceGetComputeInstanceId", mig),
                )
            )
    return out


def mig_handles(nvml: ModuleType, handle: Any) -> list[Any]:
    """The MIG instances of a GPU in MIG mode; [] when MIG is off or unsupported."""
    try:
        current, _pending = nvml.nvmlDeviceGetMigMode(handle)
    except (AttributeError, nvml.NVMLError):
        return []  # not a MIG-capable GPU (NVMLError_NotSupported), or an old pynvml
    if current != getattr(nvml, "NVML_DEVICE_MIG_ENABLE", 1):
        return []
    out = []
    for i in range(int(nvml.nvmlDeviceGetMaxMigDeviceCount(handle))):
        try:
            out.append(nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, i))
        except nvml.NVMLError:
            continue  # a slot with no instance (NVMLError_NotFound)
    return out


def _optional_int(nvml: ModuleType, fn: str, handle: Any) -> int | None:
    try:
        return int(getattr(nvml, fn)(handle))
    except (AttributeError, nvml.NVMLError):
        return None


def parse_visible_devices(value: str | None) -> list[str] | None:
    """CUDA_VISIBLE_DEVICES entries as CUDA reads them; None when unset (every GPU visible).

    CUDA stops at the first entry it cannot parse ("0,-1,2" shows only GPU 0); an empty value
    hides every GPU.
    """
    if value is None:
        return None
    out: list[str] = []
    for raw in value.split(","):
        entry = raw.strip()
        if not (entry.isdigit() or entry.startswith(("GPU-", "MIG-"))):
            break
        out.append(entry)
    return out


def resolve_entry(entry: str, devices: list[NvmlDevice], *, pci_order: bool) -> NvmlDevice | None:
    """The NVML device one CUDA_VISIBLE_DEVICES entry (or Ray GPU id) names, or None.

    UUIDs match in full or by a unique prefix, as CUDA accepts them; "MIG-GPU-<uuid>/<gi>/<ci>"
    is the pre-R470 MIG form. An ordinal is a CUDA ordinal: it equals NVML's (PCI) index only when
    `pci_order` (CUDA_DEVICE_ORDER=PCI_BUS_ID, or GPUs of one model, whose order CUDA cannot tell
    apart by speed).
    """
    gpus = [d for d in devices if d.parent_uuid is None]
    if entry.isdigit():
        k = int(entry)
        return gpus[k] if pci_order and k < len(gpus) else None
    if entry.startswith("MIG-GPU-"):
        parent, _, ids = entry[len("MIG-"):].partition("/")
        gi, _, ci = ids.partition("/")
        for d in devices:
            if d.parent_uuid == parent and str(d.gpu_instance) == gi and str(d.compute_instance) == ci:
                return d
        return None
    pool = [d for d in devices if d.uuid.startswith("MIG-")] if entry.startswith("MIG-") else gpus
    matches = [d for d in pool if d.uuid.lower().startswith(entry.lower())]
    return matches[0] if len(matches) == 1 else None


def cuda_driver_uuids() -> list[str] | None:
    """UUIDs (no prefix, lower case) of the GPUs this process's CUDA sees, in cuda:N order.

    Asks the CUDA driver (libcuda) directly: cuInit loads the driver but creates no context, so
    nothing is allocated on any GPU. `cuDeviceGetUuid_v2` names a MIG instance by its own UUID
    (v1 gives its GPU's). None when the driver cannot be loaded or initialised.
    """
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    if cuda.cuInit(0) != 0:
        return None
    count = ctypes.c_int()
    if cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return None
    get_uuid = getattr(cuda, "cuDeviceGetUuid_v2", None) or cuda.cuDeviceGetUuid
    out = []
    for ordinal in range(count.value):
        device = ctypes.c_int()
        raw = (ctypes.c_ubyte * 16)()
        if cuda.cuDeviceGet(ctypes.byref(device), ordinal) != 0 or get_uuid(raw, device) != 0:
            return None
        h = bytes(raw).hex()
        out.append(f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}")
    return out


def visible_gpu_uuids(
    entries: list[str] | None = None,
    *,
    nvml: ModuleType | None = None,
    driver_uuids: Callable[[], list[str] | None] | None = None,
    environ: Mapping[str, str] | None = None,
) -> list[str]:
    """NVML UUIDs of this process's cuda:0, cuda:1, ... (MIG instances by their MIG UUID).

    `entries` are Ray's GPU ids for this replica (the same values Ray writes into
    CUDA_VISIBLE_DEVICES); by default CUDA_VISIBLE_DEVICES itself. Raises LookupError when an
    entry names no GPU NVML knows.
    """
    env = os.environ if environ is None else environ
    if entries is None:
        entries = parse_visible_devices(env.get("CUDA_VISIBLE_DEVICES"))
    devices = nvml_devices(nvml)
    by_bare = {d.bare: d for d in devices}
    from_driver = (driver_uuids or cuda_driver_uuids)()
    if from_driver is not None and (entries is None or len(from_driver) == len(entries)):
        found = [by_bare.get(u.lower()) for u in from_driver]
        if all(found):
            return [d.uuid for d in found if d is not None]
        logger.warning("the CUDA driver names GPUs NVML does not know (%s); resolving %s instead", from_driver, entries)
    if entries is None:
        entries = [str(i) for i in range(len([d for d in devices if d.parent_uuid is None]))]
    names = {d.name for d in devices if d.parent_uuid is None}
    pci_order = env.get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID" or len(names) <= 1
    out = []
    for entry in entries:
        device = resolve_entry(entry, devices, pci_order=pci_order)
        if device is None:
            why = (
                "an ordinal on a node with GPUs of different models, where CUDA's order is not NVML's; set "
                "CUDA_DEVICE_ORDER=PCI_BUS_ID or give GPUs by UUID"
                if entry.isdigit() and not pci_order
                else "no such GPU, or an ambiguous UUID prefix"
            )
            raise LookupError(f"cannot map GPU {entry!r} to an NVML UUID: {why}")
        out.append(device.uuid)
    return out


def replica_gpu_uuids(node_id: str, gpu_ids: list[str | int]) -> list[str]:
    """Map the GPU ids Ray gave this replica to NVML UUIDs, or to simulated ids without NVML."""
    entries = [str(g) for g in gpu_ids]
    if nvml_gpu_count() > 0:
        try:
            return visible_gpu_uuids(entries)
        except Exception:
            logger.warning("could not map GPU ids %s to NVML UUIDs", entries, exc_info=True)
    return [simulated_uuid(node_id, int(g) if g.isdigit() else i) for i, g in enumerate(entries)]


def nvml_free_bytes(uuid: str) -> int | None:
    """Free bytes on one GPU by UUID, for the local check when the router is unreachable."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).free)
    except Exception:
        return None
