"""NvmlProbe against the real driver: skipped on machines without an NVIDIA GPU.

Checks what the unit tests' fake `pynvml` cannot: the field names and units of the installed
nvidia-ml-py, and that reading memory creates no CUDA context (the probe runs in the router's
node actor, which must not pin ~500 MiB on every GPU).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from serve_app.cluster.probes import NvmlProbe, pick_probe
from tests.gpu.tier import GPU_ONLY

pytestmark = GPU_ONLY


def test_readings_are_consistent() -> None:
    readings = NvmlProbe().read()
    assert readings, "NVML is available but reported no GPU"
    indices = [r.index for r in readings]  # MIG instances share their GPU's index
    assert indices == sorted(indices) and set(indices) == set(range(max(indices) + 1))
    for r in readings:
        assert r.uuid.startswith(("GPU-", "MIG-")), r.uuid
        assert isinstance(r.name, str) and r.name
        assert r.total_bytes > 0
        assert 0 <= r.free_bytes <= r.total_bytes
        # used + free can fall short of total by the driver's reserved memory (NVML v2 info).
        assert r.used_bytes + r.free_bytes <= r.total_bytes
        assert not r.simulated
        for pid, used in r.processes:
            assert pid > 0 and used >= 0


def test_visible_indices_filter() -> None:
    everything = NvmlProbe().read()
    assert [r.uuid for r in NvmlProbe(visible_indices=[0]).read()] == [r.uuid for r in everything if r.index == 0]


def test_cuda0_maps_to_the_uuid_torch_sees() -> None:
    """The CUDA driver's cuda:0, matched in NVML by UUID, is the GPU torch calls cuda:0."""
    from serve_app.cluster.gpu import cuda_driver_uuids, visible_gpu_uuids

    uuids = visible_gpu_uuids()
    assert uuids and uuids[0] in {r.uuid for r in NvmlProbe().read()}
    driver = cuda_driver_uuids()
    assert driver is not None and uuids[0].endswith(driver[0])
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA (the CPU build is installed)")
    if uuids[0].startswith("MIG-"):
        pytest.skip("torch's device uuid may name the MIG instance's GPU, not the instance")
    code = "import torch; print(torch.cuda.get_device_properties(0).uuid)"
    seen = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert uuids[0].split("-", 1)[1] == seen.removeprefix("GPU-").removeprefix("MIG-")


def test_mapping_creates_no_cuda_context() -> None:
    code = (
        "import os, sys; from serve_app.cluster.gpu import visible_gpu_uuids; "
        "from serve_app.cluster.probes import NvmlProbe; u = visible_gpu_uuids(); "
        "pids = {pid for r in NvmlProbe().read() for pid, _ in r.processes}; "
        "print(bool(u), os.getpid() in pids, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "False", "False"]


def test_pick_probe_picks_nvml() -> None:
    assert isinstance(pick_probe("gpu-test"), NvmlProbe)


def test_reading_creates_no_cuda_context() -> None:
    # In a fresh process: read, then check our pid is not among the GPU's compute processes
    # and torch was never imported.
    code = (
        "import os, sys; from serve_app.cluster.probes import NvmlProbe; p = NvmlProbe(); p.read(); "
        "rs = p.read(); pids = {pid for r in rs for pid, _ in r.processes}; "
        "print(os.getpid() in pids, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
