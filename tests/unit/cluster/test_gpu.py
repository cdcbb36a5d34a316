"""GPU identity without a GPU: CUDA_VISIBLE_DEVICES entries and Ray ids to NVML UUIDs.

NVML is a fake module here (no driver on this machine); the CUDA driver's answer is injected
as the list of UUIDs it would give, in this process's cuda:N order.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field

import pytest

from serve_app.cluster import gpu
from serve_app.cluster.gpu import cuda_driver_uuids, parse_visible_devices, replica_gpu_uuids, visible_gpu_uuids
from serve_app.cluster.probes import NvmlProbe

GiB = 1024**3
# A node whose CUDA order differs from NVML's: NVML (PCI order) has the A10G first, CUDA's
# FASTEST_FIRST puts the H100 first.
A10G = "GPU-aaaaaaaa-0000-0000-0000-000000000001"
H100 = "GPU-bbbbbbbb-0000-0000-0000-000000000002"
A100 = "GPU-cccccccc-0000-0000-0000-000000000003"
MIG_A = "MIG-dddddddd-0000-0000-0000-000000000004"
MIG_B = "MIG-eeeeeeee-0000-0000-0000-000000000005"


@dataclass
class Mem:
    total: int
    used: int
    free: int


@dataclass
class Handle:
    uuid: str
    name: str
    memory: Mem
    mig_mode: int | None = None  # None: not MIG-capable
    migs: list[Handle | None] = field(default_factory=list)
    gi: int | None = None
    ci: int | None = None


def fake_nvml(handles: list[Handle]) -> types.ModuleType:
    mod = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    class NVMLError_NotSupported(NVMLError):
        pass

    class NVMLError_NotFound(NVMLError):
        pass

    def mig_mode(h: Handle) -> tuple[int, int]:
        if h.mig_mode is None:
            raise NVMLError_NotSupported("not supported")
        return h.mig_mode, h.mig_mode

    def mig_by_index(h: Handle, i: int) -> Handle:
        m = h.migs[i]
        if m is None:
            raise NVMLError_NotFound("no instance")
        return m

    def by_uuid(uuid: str) -> Handle:
        for h in handles:
            for x in [h, *[m for m in h.migs if m]]:
                if x.uuid == uuid:
                    return x
        raise NVMLError_NotFound(uuid)

    ns = mod.__dict__
    ns.update(
        NVMLError=NVMLError, NVMLError_NotSupported=NVMLError_NotSupported, NVMLError_NotFound=NVMLError_NotFound,
        NVML_DEVICE_MIG_ENABLE=1,
        nvmlInit=lambda: None,
        nvmlDeviceGetCount=lambda: len(handles),
        nvmlDeviceGetHandleByIndex=lambda i: handles[i],
        nvmlDeviceGetHandleByUUID=by_uuid,
        nvmlDeviceGetUUID=lambda h: h.uuid.encode(),  # pynvml < 11.5 returns bytes
        nvmlDeviceGetName=lambda h: h.name,
        nvmlDeviceGetMemoryInfo=lambda h: h.memory,
        nvmlDeviceGetComputeRunningProcesses=lambda h: [],
        nvmlDeviceGetMigMode=mig_mode,
        nvmlDeviceGetMaxMigDeviceCount=lambda h: len(h.migs),
        nvmlDeviceGetMigDeviceHandleByIndex=mig_by_index,
        nvmlDeviceGetGpuInstanceId=lambda h: h.gi,
        nvmlDeviceGetComputeInstanceId=lambda h: h.ci,
    )
    return mod


def mixed_node() -> types.ModuleType:
    return fake_nvml([
        Handle(A10G, "NVIDIA A10G", Mem(24 * GiB, GiB, 23 * GiB)),
        Handle(H100, "NVIDIA H100 80GB HBM3", Mem(80 * GiB, 0, 80 * GiB)),
    ])  # fmt: skip


def mig_node() -> types.ModuleType:
    return fake_nvml([
        Handle(A100, "NVIDIA A100-SXM4-40GB", Mem(40 * GiB, 0, 40 * GiB), mig_mode=1, migs=[
            Handle(MIG_A, "NVIDIA A100-SXM4-40GB MIG 3g.20gb", Mem(20 * GiB, 2 * GiB, 18 * GiB), gi=1, ci=0),
            None,  # an empty slot
            Handle(MIG_B, "NVIDIA A100-SXM4-40GB MIG 2g.10gb", Mem(10 * GiB, 0, 10 * GiB), gi=5, ci=0),
        ]),
        Handle(A10G, "NVIDIA A10G", Mem(24 * GiB, 0, 24 * GiB), mig_mode=0),
    ])  # fmt: skip


def bare(uuid: str) -> str:
    return uuid.split("-", 1)[1]


def no_driver() -> None:
    return None


def test_parse_visible_devices_like_cuda() -> None:
    assert parse_visible_devices(None) is None
    assert parse_visible_devices("") == []
    assert parse_visible_devices("1, 0") == ["1", "0"]
    assert parse_visible_devices(f"{H100},{MIG_A}") == [H100, MIG_A]
    assert parse_visible_devices("0,-1,2") == ["0"]  # CUDA stops at the first invalid entry


def test_the_drivers_order_wins_over_nvmls() -> None:
    """CUDA's cuda:0 is the H100 although NVML lists it second: no index is passed through."""
    uuids = visible_gpu_uuids(["0", "1"], nvml=mixed_node(), driver_uuids=lambda: [bare(H100), bare(A10G)])
    assert uuids == [H100, A10G]


def test_ordinals_without_the_driver_need_pci_order_on_a_mixed_node() -> None:
    with pytest.raises(LookupError, match="CUDA_DEVICE_ORDER=PCI_BUS_ID"):
        visible_gpu_uuids(["1"], nvml=mixed_node(), driver_uuids=no_driver, environ={})
    env = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert visible_gpu_uuids(["1"], nvml=mixed_node(), driver_uuids=no_driver, environ=env) == [H100]


def test_ordinals_on_a_node_of_one_model_follow_pci_order() -> None:
    nvml = fake_nvml([Handle(A10G, "NVIDIA A10G", Mem(1, 0, 1)), Handle(H100.replace("b", "f"), "NVIDIA A10G",
                                                                         Mem(1, 0, 1))])
    assert visible_gpu_uuids(["1"], nvml=nvml, driver_uuids=no_driver, environ={}) == [H100.replace("b", "f")]


def test_uuid_entries_and_prefixes_are_kept_not_dropped() -> None:
    nvml = mixed_node()
    assert visible_gpu_uuids([H100, A10G], nvml=nvml, driver_uuids=no_driver, environ={}) == [H100, A10G]
    assert visible_gpu_uuids(["GPU-bbbb"], nvml=nvml, driver_uuids=no_driver, environ={}) == [H100]
    with pytest.raises(LookupError, match="no such GPU"):
        visible_gpu_uuids(["GPU-"], nvml=nvml, driver_uuids=no_driver, environ={})  # ambiguous prefix


def test_mig_entries_name_the_instance_not_the_gpu() -> None:
    nvml = mig_node()
    assert visible_gpu_uuids([MIG_B], nvml=nvml, driver_uuids=no_driver, environ={}) == [MIG_B]
    legacy = f"MIG-{A100}/5/0"  # the pre-R470 form: MIG-GPU-<uuid>/<gpu instance>/<compute instance>
    assert visible_gpu_uuids([legacy], nvml=nvml, driver_uuids=no_driver, environ={}) == [MIG_B]
    # The driver names a MIG instance by its own UUID (cuDeviceGetUuid_v2).
    assert visible_gpu_uuids(["0"], nvml=nvml, driver_uuids=lambda: [bare(MIG_A)]) == [MIG_A]


def test_environment_is_read_when_no_ids_are_given() -> None:
    env = {"CUDA_VISIBLE_DEVICES": f"{A10G}"}
    assert visible_gpu_uuids(nvml=mixed_node(), driver_uuids=no_driver, environ=env) == [A10G]


def test_a_driver_disagreeing_with_nvml_falls_back_to_the_entries() -> None:
    uuids = visible_gpu_uuids([H100], nvml=mixed_node(), driver_uuids=lambda: ["ffffffff-0000"], environ={})
    assert uuids == [H100]


def test_replica_ids_map_through_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", mixed_node())
    monkeypatch.setattr(gpu, "cuda_driver_uuids", lambda: [bare(H100)])
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "FASTEST_FIRST")
    assert replica_gpu_uuids("node0000", ["0"]) == [H100]
    monkeypatch.setattr(gpu, "cuda_driver_uuids", lambda: None)  # no libcuda: the entry itself
    assert replica_gpu_uuids("node0000", [A10G]) == [A10G]


def test_replica_ids_without_nvml_are_simulated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu, "nvml_gpu_count", lambda: 0)
    assert replica_gpu_uuids("node0000abcd", [0, "GPU-x"]) == ["sim-node0000-0", "sim-node0000-1"]


def test_probe_reports_mig_instances_by_their_own_uuid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", mig_node())
    readings = NvmlProbe().read()
    assert [(r.uuid, r.index, r.total_bytes, r.used_bytes) for r in readings] == [
        (MIG_A, 0, 20 * GiB, 2 * GiB),
        (MIG_B, 0, 10 * GiB, 0),
        (A10G, 1, 24 * GiB, 0),
    ]
    assert readings[0].name.endswith("MIG 3g.20gb")


def test_the_driver_is_not_asked_where_there_is_none() -> None:
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        assert cuda_driver_uuids() is None
    else:
        pytest.skip("this machine has a CUDA driver")
