"""Memory probes without a GPU: the simulation's arithmetic, and NVML against a fake `pynvml`."""

from __future__ import annotations

import logging
import subprocess
import sys
import types
from dataclasses import dataclass

import pytest

from serve_app.cluster.probes import GpuReading, MemoryProbe, NvmlProbe, SimulatedProbe, pick_probe, simulated_gpu_ids

GiB = 1024**3


# --- simulation ---------------------------------------------------------------------------


def test_simulated_used_is_accounted_plus_external() -> None:
    ours = {"sim-n0-0": 3 * GiB, "sim-n0-1": 0}
    probe = SimulatedProbe(
        [("sim-n0-0", 16 * GiB), ("sim-n0-1", 8 * GiB)], accounted=ours.__getitem__, external={"sim-n0-1": GiB}
    )
    a, b = probe.read()
    assert (a.uuid, a.index, a.total_bytes, a.used_bytes, a.free_bytes) == ("sim-n0-0", 0, 16 * GiB, 3 * GiB, 13 * GiB)
    assert (b.uuid, b.index, b.used_bytes, b.free_bytes) == ("sim-n0-1", 1, GiB, 7 * GiB)
    assert a.simulated and b.simulated

    probe.set_external("sim-n0-0", 2 * GiB)
    ours["sim-n0-0"] = 4 * GiB  # the callable is read on every read()
    assert probe.read()[0].used_bytes == 6 * GiB


def test_simulated_usage_is_clamped_to_the_total() -> None:
    probe = SimulatedProbe([("g", 8 * GiB)], accounted=lambda _: 6 * GiB, external={"g": 5 * GiB})
    (r,) = probe.read()
    assert (r.used_bytes, r.free_bytes) == (8 * GiB, 0)


def test_simulated_probe_copies_its_external_dict() -> None:
    external = {"g": GiB}
    probe = SimulatedProbe([("g", 8 * GiB)], external=external)
    probe.set_external("g", 2 * GiB)
    assert external == {"g": GiB}
    probe.set_external("g", -5)
    assert probe.read()[0].used_bytes == 0


def test_simulated_ids_name_the_node() -> None:
    assert simulated_gpu_ids("node-a", 2) == ["sim-node-a-0", "sim-node-a-1"]


def test_both_probes_satisfy_the_protocol() -> None:
    assert isinstance(SimulatedProbe([]), MemoryProbe)
    assert isinstance(NvmlProbe(), MemoryProbe)


# --- NVML absent (this machine) -----------------------------------------------------------


def test_nvml_is_unavailable_without_a_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(init_error="NVMLError_LibraryNotFound"))
    assert NvmlProbe.available() is False


def test_nvml_is_unavailable_without_pynvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    assert NvmlProbe.available() is False


def test_nvml_with_no_gpus_counts_as_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(devices=[]))
    assert NvmlProbe.available() is False


def test_pick_probe_falls_back_to_simulation_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(init_error="NVMLError_LibraryNotFound"))
    with caplog.at_level(logging.INFO, logger="serve_app.cluster.probes"):
        probe = pick_probe("n0", simulated_count=2, simulated_total_bytes=4 * GiB, external={"sim-n0-1": GiB})
    assert isinstance(probe, SimulatedProbe)
    assert [(r.uuid, r.total_bytes, r.used_bytes) for r in probe.read()] == [
        ("sim-n0-0", 4 * GiB, 0),
        ("sim-n0-1", 4 * GiB, GiB),
    ]
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("Memory probe on n0: simulation, 2 logical GPU(s) of 4.0 GiB")
    assert "NVMLError_LibraryNotFound" in line


def test_the_real_pynvml_here_reports_unavailable() -> None:
    # This machine has nvidia-ml-py but no driver: nvmlInit raises NVMLError_LibraryNotFound.
    # In a subprocess, so no other test's fake module or init state leaks in, and to check
    # that probing never imports torch (which would create a CUDA context on a GPU machine).
    code = (
        "import sys; from serve_app.cluster.probes import NvmlProbe, pick_probe; "
        "import pynvml; has_gpu = NvmlProbe.available(); p = pick_probe('n0'); "
        "print(has_gpu, type(p).__name__, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    if out[0] == "True":
        pytest.skip("this machine has a working NVML")
    assert out == ["False", "SimulatedProbe", "False"]


# --- NVML through a fake pynvml -----------------------------------------------------------


@dataclass
class FakeMemory:
    total: int
    used: int
    free: int


@dataclass
class FakeProcess:
    pid: int
    usedGpuMemory: int | None  # pynvml's field name


@dataclass
class FakeDevice:
    uuid: bytes | str
    name: bytes | str
    memory: FakeMemory
    processes: list[FakeProcess] | str  # a str names the NVMLError subclass to raise


def fake_nvml(devices: list[FakeDevice] | None = None, init_error: str | None = None) -> types.ModuleType:
    """A stand-in for `pynvml` with just the calls NvmlProbe makes, counting nvmlInit."""
    mod = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    errors = {"NVMLError": NVMLError}
    for name in ("NVMLError_NotSupported", "NVMLError_LibraryNotFound", "NVMLError_NoPermission"):
        errors[name] = type(name, (NVMLError,), {})
    for name, cls in errors.items():
        setattr(mod, name, cls)
    mod.init_calls = 0  # type: ignore[attr-defined]
    devices = devices if devices is not None else []

    def nvmlInit() -> None:
        mod.init_calls += 1  # type: ignore[attr-defined]
        if init_error:
            raise errors[init_error]("NVML Shared Library Not Found")

    def processes(handle: FakeDevice) -> list[FakeProcess]:
        if isinstance(handle.processes, str):
            raise errors[handle.processes]("nope")
        return handle.processes

    mod.nvmlInit = nvmlInit  # type: ignore[attr-defined]
    mod.nvmlDeviceGetCount = lambda: len(devices)  # type: ignore[attr-defined]
    mod.nvmlDeviceGetHandleByIndex = lambda i: devices[i]  # type: ignore[attr-defined]
    mod.nvmlDeviceGetUUID = lambda h: h.uuid  # type: ignore[attr-defined]
    mod.nvmlDeviceGetName = lambda h: h.name  # type: ignore[attr-defined]
    mod.nvmlDeviceGetMemoryInfo = lambda h: h.memory  # type: ignore[attr-defined]
    mod.nvmlDeviceGetComputeRunningProcesses = processes  # type: ignore[attr-defined]
    return mod


def two_gpus() -> list[FakeDevice]:
    return [
        FakeDevice(
            b"GPU-aaaa",  # pynvml < 11.5 returns bytes
            b"NVIDIA A10G",
            FakeMemory(24 * GiB, 5 * GiB, 19 * GiB),
            [FakeProcess(4242, 3 * GiB), FakeProcess(17, None)],
        ),
        FakeDevice("GPU-bbbb", "NVIDIA H100 80GB HBM3", FakeMemory(80 * GiB, 0, 80 * GiB), "NVMLError_NotSupported"),
    ]


def test_nvml_probe_decodes_and_lists_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(two_gpus()))
    assert NvmlProbe.available()
    a, b = NvmlProbe().read()
    assert a == GpuReading(
        uuid="GPU-aaaa",
        index=0,
        name="NVIDIA A10G",
        total_bytes=24 * GiB,
        used_bytes=5 * GiB,
        free_bytes=19 * GiB,
        processes=((17, 0), (4242, 3 * GiB)),  # None: memory the driver cannot attribute
        simulated=False,
    )
    assert (b.uuid, b.name, b.index, b.processes) == ("GPU-bbbb", "NVIDIA H100 80GB HBM3", 1, ())


def test_nvml_probe_tolerates_other_process_listing_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    gpus = two_gpus()
    gpus[0].processes = "NVMLError_NoPermission"
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(gpus))
    assert [r.processes for r in NvmlProbe().read()] == [(), ()]


def test_nvml_probe_filters_visible_indices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(two_gpus()))
    assert [r.uuid for r in NvmlProbe(visible_indices=[1, 7]).read()] == ["GPU-bbbb"]
    assert NvmlProbe(visible_indices=[]).read() == []


def test_nvml_is_initialised_once(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = fake_nvml(two_gpus())
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    NvmlProbe.available()
    probe = NvmlProbe()
    probe.read()
    probe.read()
    NvmlProbe().read()
    assert nvml.init_calls == 1  # type: ignore[attr-defined]


def test_pick_probe_uses_nvml_when_it_works(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(two_gpus()))
    with caplog.at_level(logging.INFO, logger="serve_app.cluster.probes"):
        probe = pick_probe("n0", visible_indices=[0])
    assert isinstance(probe, NvmlProbe)
    assert [r.getMessage() for r in caplog.records] == ["Memory probe on n0: NVML, 1 GPU(s) (0: NVIDIA A10G 24.0 GiB)."]
    forced = pick_probe("n0", force_simulated=True)
    assert isinstance(forced, SimulatedProbe)
