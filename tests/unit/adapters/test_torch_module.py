"""`TorchModuleAdapter` with small real torch modules.

On the CPU the weights stay where they are and only the tier is recorded, so these tests check
bookkeeping and outputs; `test_torch_layout.py` runs the flat-buffer moves on the CPU, and
`tests/gpu/test_torch_tier.py` checks the memory itself on a GPU.
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
