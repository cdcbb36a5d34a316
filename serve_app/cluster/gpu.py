"""The seam for side effects on the accelerator: CUDA and NVML questions asked by replicas.

Nothing here creates a CUDA context or imports torch: NVML answers "is there a GPU" cheaply,
and torch is only imported where a model loads.
"""

from __future__ import annotations

import logging
import os

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


def nvml_uuids_for_indices(indices: list[int]) -> list[str]:
    import pynvml

    pynvml.nvmlInit()
    out = []
    for i in indices:
        uuid = pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i))
        out.append(uuid.decode() if isinstance(uuid, bytes) else uuid)
    return out


def replica_gpu_uuids(node_id: str, gpu_ids: list[str | int]) -> list[str]:
    """Map the GPU ids Ray gave this replica to NVML UUIDs, or to simulated ids without NVML."""
    indices = [int(g) for g in gpu_ids if str(g).isdigit()]
    if nvml_gpu_count() > 0:
        try:
            return nvml_uuids_for_indices(indices)
        except Exception:
            logger.warning("could not map GPU indices %s to NVML UUIDs", indices, exc_info=True)
    return [simulated_uuid(node_id, i) for i in indices]


def nvml_free_bytes(uuid: str) -> int | None:
    """Free bytes on one GPU by UUID, for the local check when the router is unreachable."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).free)
    except Exception:
        return None
