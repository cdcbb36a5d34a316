"""`TorchModuleAdapter` with small real torch modules.

On the CPU the weights stay where they are and only the tier is recorded, so the CPU tests
check bookkeeping and outputs. `TestOnCuda` (marked `gpu`, skipped without CUDA) checks the
memory itself: VRAM freed on offload, pinned buffers reused, NVML back to its baseline.
"""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from serve_app.adapters import Footprint, ModelAdapter
from serve_app.adapters.torch_module import TorchModuleAdapter, weights_size

MiB = 1024**2


def tensor_bytes(module: nn.Module) -> int:
    """Distinct parameters (tied ones once) plus buffers, the way the adapter should count them."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def mlp(width: int = 16) -> nn.Module:
    """A Sequential with buffers (BatchNorm's running stats), in eval mode so outputs are fixed."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, 4)).eval()


class TiedLM(nn.Module):
    """Input embedding and output head share one weight, as in most language models."""

    def __init__(self, vocab: int = 10, dim: int = 6) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("offset", torch.arange(dim, dtype=torch.float32) / 10)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids) + self.offset)


def run(adapter: TorchModuleAdapter, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return adapter.model(x.to(adapter.device)).cpu()


# --- on the CPU ---------------------------------------------------------------------------------


def test_adapter_implements_the_protocol() -> None:
    assert isinstance(TorchModuleAdapter(lambda device: mlp()), ModelAdapter)


def test_nothing_is_built_before_load() -> None:
    built: list[str] = []
    adapter = TorchModuleAdapter(lambda device: built.append(device) or mlp())
    assert built == [] and adapter.model is None and adapter.footprint() == Footprint()
    adapter.load("cpu")
    assert built == ["cpu"] and adapter.device == "cpu"


def test_footprint_counts_parameters_and_buffers() -> None:
    adapter = TorchModuleAdapter(lambda device: mlp().to(device))
    adapter.load("cpu")
    # Linear 8x16+16, BatchNorm 2x16 parameters and 2x16 float + 1 int64 buffers, Linear 16x4+4.
    expected = (8 * 16 + 16 + 2 * 16 + 16 * 4 + 4) * 4 + 2 * 16 * 4 + 8
    assert expected == tensor_bytes(adapter.model) == 1112
    assert adapter.footprint() == Footprint(bytes_gpu=expected, bytes_cpu=0)


def test_footprint_counts_tied_weights_once() -> None:
    adapter = TorchModuleAdapter(lambda device: TiedLM().to(device))
    adapter.load("cpu")
    assert adapter.model.head.weight is adapter.model.embed.weight
    # One 10x6 weight and a 6-float buffer; a state_dict sum would count the weight twice.
    assert adapter.footprint().bytes_gpu == (10 * 6 + 6) * 4 == tensor_bytes(adapter.model)
    assert sum(t.numel() * 4 for t in adapter.model.state_dict().values()) > adapter.footprint().bytes_gpu


def test_module_of_finds_the_module_inside_a_wrapper() -> None:
    adapter = TorchModuleAdapter(lambda device: {"net": mlp()}, module_of=lambda obj: obj["net"])
    adapter.load("cpu")
    assert adapter.footprint().bytes_gpu == 1112


@pytest.mark.parametrize("build", [mlp, TiedLM], ids=["sequential", "tied"])
def test_offload_and_restore_keep_outputs_and_record_the_tier(build: Any) -> None:
    adapter = TorchModuleAdapter(lambda device: build().to(device))
    adapter.load("cpu")
    x = torch.randn(3, 8) if build is mlp else torch.tensor([[1, 2, 3], [4, 5, 9]])
    expected = run(adapter, x)
    size = adapter.footprint().bytes_gpu
    assert size > 0

    for _ in range(2):
        adapter.to_cpu()
        assert adapter.footprint() == Footprint(bytes_gpu=0, bytes_cpu=size)
        adapter.to_cpu()  # a second offload is a no-op
        assert adapter.footprint() == Footprint(bytes_gpu=0, bytes_cpu=size)
        adapter.to_gpu()
        assert adapter.footprint() == Footprint(bytes_gpu=size, bytes_cpu=0)
        assert torch.equal(run(adapter, x), expected)


def test_release_drops_the_model() -> None:
    adapter = TorchModuleAdapter(lambda device: mlp().to(device))
    adapter.load("cpu")
    ref = weakref.ref(adapter.model)
    adapter.to_cpu()
    adapter.release()
    gc.collect()
    assert adapter.model is None and ref() is None
    assert adapter.footprint() == Footprint()

    adapter.load("cpu")  # a released adapter loads again
    assert adapter.footprint().bytes_gpu == 1112


def test_failed_load_leaves_nothing_behind() -> None:
    def broken(device: str) -> nn.Module:
        raise OSError("weights file truncated")

    adapter = TorchModuleAdapter(broken)
    with pytest.raises(OSError, match="truncated"):
        adapter.load("cpu")
    assert adapter.model is None and adapter.footprint() == Footprint()


def test_weights_size_of_a_directory(tmp_path: Path) -> None:
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "model-00002-of-00002.safetensors").write_bytes(b"x" * 300)
    (tmp_path / "config.json").write_bytes(b"{}" * 500)  # not weights
    (tmp_path / "tokenizer.txt").write_bytes(b"x" * 50)

    assert weights_size(str(tmp_path)) == 1300
    assert weights_size(str(tmp_path / "shards" / "model-00002-of-00002.safetensors")) == 300
    assert TorchModuleAdapter(mlp, weights_path=str(tmp_path)).weights_bytes() == 1300


def test_weights_size_counts_one_format_of_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"x" * 700)
    assert weights_size(str(tmp_path)) == 700
    # The same weights shipped twice (safetensors and .bin) are one model's worth of bytes.
    (tmp_path / "model.safetensors").write_bytes(b"x" * 690)
    assert weights_size(str(tmp_path)) == 690


def test_weights_size_is_none_when_unknown(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert weights_size(str(tmp_path)) is None  # no weight files
    assert weights_size(str(tmp_path / "missing")) is None
    assert weights_size(None) is None
    assert TorchModuleAdapter(mlp).weights_bytes() is None


# --- on CUDA ------------------------------------------------------------------------------------


def big_mlp() -> nn.Module:
    """About 64 MiB of float32 weights, plus BatchNorm buffers."""
    torch.manual_seed(0)
    width = 2048
    return nn.Sequential(
        nn.Linear(width, width), nn.BatchNorm1d(width), nn.Linear(width, width), nn.Linear(width, width),
        nn.Linear(width, width),
    ).eval()  # fmt: skip


def nvml_used_bytes() -> int:
    """NVML's used memory of the GPU torch calls cuda:0 (matched by UUID, not by index)."""
    import pynvml

    pynvml.nvmlInit()
    uuid = str(torch.cuda.get_device_properties(0).uuid)
    handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}")
    return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA build of torch and a GPU")
class TestOnCuda:
    device = "cuda:0"

    @pytest.fixture(autouse=True)
    def _warm_context(self) -> None:
        # The CUDA context and cuBLAS workspace are allocated once per process and never
        # returned; create them before any baseline so they are not blamed on the adapter.
        with torch.no_grad():
            warm = nn.Linear(64, 64).to(self.device)
            warm(torch.randn(2, 64, device=self.device))
        del warm
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()

    def adapter(self) -> TorchModuleAdapter:
        return TorchModuleAdapter(lambda device: big_mlp().to(device))

    def test_offload_frees_vram_and_restore_gives_identical_outputs(self) -> None:
        adapter = self.adapter()
        baseline = torch.cuda.memory_allocated()
        adapter.load(self.device)
        size = adapter.footprint().bytes_gpu
        assert size == tensor_bytes(adapter.model) and size > 60 * MiB
        x = torch.randn(4, 2048)
        expected = run(adapter, x)
        loaded = torch.cuda.memory_allocated()
        assert loaded - baseline >= size

        adapter.to_cpu()
        assert torch.cuda.memory_allocated() <= loaded - size
        assert adapter.footprint() == Footprint(bytes_gpu=0, bytes_cpu=size)
        assert all(p.device.type == "cpu" and p.is_pinned() for p in adapter.model.parameters())

        adapter.to_gpu()
        assert all(p.device.type == "cuda" for p in adapter.model.parameters())
        assert adapter.footprint() == Footprint(bytes_gpu=size, bytes_cpu=size)  # pinned copy kept
        assert torch.equal(run(adapter, x), expected)
        adapter.release()

    def test_offload_returns_the_vram_to_the_driver(self) -> None:
        # No buffers and a large last weight: the last tensor the offload touches is 16 MiB.
        torch.manual_seed(0)
        adapter = TorchModuleAdapter(
            lambda device: nn.Sequential(nn.Linear(2048, 2048), nn.Linear(2048, 2048, bias=False)).to(device)
        )
        reserved = torch.cuda.memory_reserved()
        adapter.load(self.device)
        assert torch.cuda.memory_reserved() - reserved >= 16 * MiB
        adapter.to_cpu()
        # Cached blocks not handed back to the driver still count as used to NVML (and the router).
        assert torch.cuda.memory_reserved() - reserved <= 2 * MiB
        adapter.release()

    def test_tied_weights_stay_tied_across_moves(self) -> None:
        adapter = TorchModuleAdapter(lambda device: TiedLM().to(device))
        adapter.load(self.device)
        ids = torch.tensor([[1, 2, 3]])
        expected = run(adapter, ids)
        adapter.to_cpu()
        adapter.to_gpu()
        model = adapter.model
        assert model.head.weight is model.embed.weight
        assert model.head.weight.device.type == "cuda"
        assert torch.equal(run(adapter, ids), expected)
        adapter.release()

    def test_pinned_buffers_are_reused_across_offloads(self) -> None:
        adapter = self.adapter()
        adapter.load(self.device)

        def host_pointers() -> list[int]:
            return [t.data_ptr() for t in [*adapter.model.parameters(), *adapter.model.buffers()]]

        adapter.to_cpu()
        first = host_pointers()
        adapter.to_gpu()
        adapter.to_cpu()
        assert host_pointers() == first
        adapter.release()

    def test_release_returns_nvml_used_memory_to_the_baseline(self) -> None:
        def cycle() -> int:
            """Load, serve, offload, restore; return NVML's used bytes just before release."""
            adapter = self.adapter()
            adapter.load(self.device)
            run(adapter, torch.randn(4, 2048))
            adapter.to_cpu()
            adapter.to_gpu()
            used = nvml_used_bytes()
            adapter.release()
            gc.collect()
            return used

        # CUDA loads kernels lazily and never unloads them: one warm-up cycle first, so the
        # baseline already holds every kernel the measured cycle uses.
        cycle()
        baseline = nvml_used_bytes()
        assert cycle() - baseline >= 60 * MiB  # NVML sees the load at all
        assert nvml_used_bytes() - baseline <= 64 * MiB
