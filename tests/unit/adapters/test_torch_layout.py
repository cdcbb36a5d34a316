"""The torch adapter's flat-buffer moves, run on the CPU.

`flat_moves_on_cpu=True` runs the same layout, copy, rebind and rollback code as on CUDA, with a
second CPU allocation standing in for device memory; only pinning, streams and the CUDA
allocator are left to `tests/gpu/`.
"""

from __future__ import annotations

import gc
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from serve_app.adapters import Footprint
from serve_app.adapters import torch_module as tm
from serve_app.adapters.torch_module import (
    ALIGN_BYTES,
    LayoutChanged,
    TorchModuleAdapter,
    UnsupportedLayout,
    check_movable,
    iter_tensors,
    locked_bytes,
    module_entries,
    plan_layout,
)


class Mixed(nn.Module):
    """Every way a module holds tensors that a naive per-tensor copy gets wrong."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        fused = torch.randn(12, 4)  # views of one fused tensor, as in a packed qkv projection
        self.q, self.k, self.v = (nn.Parameter(fused[i * 4 : (i + 1) * 4]) for i in range(3))
        self.conv = nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
        self.transposed = nn.Parameter(torch.randn(5, 7).t())
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.norm = nn.BatchNorm1d(4).eval()
        self.shared = nn.Linear(4, 4)
        self.again = self.shared  # one submodule under two names
        self.register_buffer("steps", torch.arange(3))
        self.register_buffer("nothing", torch.empty(0, 3))
        self.register_buffer("absent", None)

    def forward(self, ids: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids).mean(1)
        h = self.norm(h @ self.q @ self.k.t() @ self.v) + self.again(h)
        return self.head(h).sum() + self.conv(image).sum() + self.transposed.sum() + self.steps.sum()


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.randn(1, 3, 6, 6).to(memory_format=torch.channels_last)


def flat_adapter(build: Any = Mixed) -> TorchModuleAdapter:
    adapter = TorchModuleAdapter(lambda device: build().to(device), flat_moves_on_cpu=True)
    adapter.load("cpu")
    return adapter


def output(adapter: TorchModuleAdapter) -> torch.Tensor:
    with torch.no_grad():
        return adapter.model(*inputs())


def storage_ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@pytest.fixture
def no_gc() -> Iterator[None]:
    """Reference counting alone must free the weights: the moves never call gc.collect()."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


# --- keying and layout ---------------------------------------------------------------------------


def test_entries_are_keyed_by_qualified_name_with_every_alias() -> None:
    entries = {tuple(e.names): e.kind for e in module_entries(Mixed())}
    assert entries[("embed.weight", "head.weight")] == "param"  # tied: one entry, both names
    assert entries[("shared.weight", "again.weight")] == "param"  # a shared submodule
    assert entries[("norm.running_mean",)] == "buffer"
    assert ("absent",) not in entries  # a buffer set to None holds nothing
    names = [n for ns in entries for n in ns]
    assert len(names) == len(set(names)) and "q" in names and "conv.weight" in names


def test_layout_groups_shared_storage_and_aligns_regions() -> None:
    module = Mixed()
    layout, sources = plan_layout(module_entries(module))
    slots = {s.name: s for s in layout.slots}
    assert slots["q"].region == slots["k"].region == slots["v"].region  # one fused storage
    assert [slots[n].byte_offset for n in ("q", "k", "v")] == [0, 64, 128]
    assert slots["nothing"].region == -1  # no elements, no bytes
    assert len(sources) == len(layout.regions)
    assert all(r.offset % ALIGN_BYTES == 0 for r in layout.regions)
    assert layout.nbytes % ALIGN_BYTES == 0 and layout.nbytes >= layout.payload_bytes
    distinct = {storage_ptr(t): t.untyped_storage().nbytes() for _, t in iter_tensors(module) if t.numel()}
    assert layout.payload_bytes == sum(distinct.values())  # each storage once, tied weights once
    assert slots["conv.weight"].stride == module.conv.weight.stride()  # channels_last recorded
    assert slots["transposed"].stride == (1, 7)


def test_layout_difference_names_what_changed() -> None:
    a, _ = plan_layout(module_entries(Mixed()))
    assert a.difference(a) is None
    changed = Mixed()
    changed.steps = torch.arange(3, dtype=torch.int32)
    why = a.difference(plan_layout(module_entries(changed))[0]) or ""
    assert "steps: dtype torch.int32, expected torch.int64" in why
    gone = Mixed()
    gone.steps = None
    assert "tensors" in (a.difference(plan_layout(module_entries(gone))[0]) or "")


# --- moves ---------------------------------------------------------------------------------------


def test_cycles_keep_outputs_sharing_strides_and_alignment() -> None:
    adapter = flat_adapter()
    expected = output(adapter)
    for _ in range(3):
        adapter.to_cpu()
        adapter.to_gpu()
        model = adapter.model
        assert torch.equal(output(adapter), expected)
        assert model.head.weight is model.embed.weight and model.again is model.shared
        assert model.k.data_ptr() == model.q.data_ptr() + 64 and model.v.data_ptr() == model.q.data_ptr() + 128
        assert model.conv.weight.is_contiguous(memory_format=torch.channels_last)
        assert model.transposed.stride() == (1, 7)
        flat = adapter._device_flat
        assert all(storage_ptr(t) == storage_ptr(flat) for _, t in iter_tensors(model) if t.numel())
        assert all((t.data_ptr() - flat.data_ptr()) % 16 == 0 for _, t in iter_tensors(model))


def test_one_host_buffer_of_exact_size_reused_and_counted() -> None:
    adapter = flat_adapter()
    adapter.to_cpu()
    host = adapter._host
    assert host is not None and host.flat.numel() == host.layout.nbytes
    assert adapter.footprint() == Footprint(bytes_gpu=0, bytes_cpu=host.layout.nbytes)
    ptr = host.flat.data_ptr()
    for _ in range(3):
        adapter.to_gpu()
        assert adapter.footprint() == Footprint(bytes_gpu=host.layout.nbytes, bytes_cpu=host.layout.nbytes)
        adapter.to_cpu()
        assert adapter._host is host and host.flat.data_ptr() == ptr
        assert all(storage_ptr(t) == storage_ptr(host.flat) for _, t in iter_tensors(adapter.model) if t.numel())


def test_first_offload_frees_every_loaded_tensor_without_gc(no_gc: None) -> None:
    adapter = flat_adapter()
    loaded = [StorageWeakRef(t.untyped_storage()) for _, t in iter_tensors(adapter.model)]
    adapter.to_cpu()
    assert all(w.expired() for w in loaded)  # none kept by a loop variable or the layout


def test_later_offloads_free_the_device_block_without_gc(no_gc: None) -> None:
    adapter = flat_adapter()
    adapter.to_cpu()
    for _ in range(3):
        adapter.to_gpu()
        block = weakref.ref(adapter._device_flat)
        adapter.to_cpu()
        assert block() is None and adapter._device_flat is None


def test_weights_changed_on_the_device_are_copied_back() -> None:
    adapter = flat_adapter()
    adapter.to_cpu()
    adapter.to_gpu()
    with torch.no_grad():
        adapter.model.q.add_(1.0)
        adapter.model.norm.running_mean.fill_(0.5)
    q, mean = adapter.model.q.detach().clone(), adapter.model.norm.running_mean.clone()
    adapter.to_cpu()  # the one-copy path: the host buffer must be refreshed, not reused as is
    adapter.to_gpu()
    assert torch.equal(adapter.model.q, q) and torch.equal(adapter.model.norm.running_mean, mean)


@pytest.mark.parametrize("change", ["buffer_set_to_none", "dtype", "new_buffer"])
def test_a_changed_module_gets_a_new_host_buffer(change: str) -> None:
    adapter = flat_adapter()
    adapter.to_cpu()
    adapter.to_gpu()
    first = adapter._host
    model = adapter.model
    if change == "buffer_set_to_none":
        model.steps = None
    elif change == "dtype":
        model.half()
    else:
        model.register_buffer("extra", torch.ones(5))
    expected = {n: t.clone() for n, t in iter_tensors(model)}
    adapter.to_cpu()
    assert adapter._host is not first
    assert adapter._host.layout.difference(first.layout) is not None
    adapter.to_gpu()
    for name, t in iter_tensors(adapter.model):
        assert torch.equal(t, expected[name]), name
    assert adapter.model.head.weight is adapter.model.embed.weight


def test_restore_refuses_a_module_changed_while_offloaded() -> None:
    adapter = flat_adapter()
    expected = output(adapter)
    adapter.to_cpu()
    adapter.model.register_buffer("late", torch.zeros(2))  # not in the host buffer
    with pytest.raises(LayoutChanged, match="changed while offloaded"):
        adapter.to_gpu()
    adapter.model.late = None
    del adapter.model._buffers["late"]
    adapter.to_gpu()  # back to what was offloaded: restores
    assert torch.equal(output(adapter), expected)


def test_a_failure_partway_through_restore_rolls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = flat_adapter()
    expected = output(adapter)
    adapter.to_cpu()
    host = adapter._host
    real_bind = tm.bind_views
    device_views: list[weakref.ref[torch.Tensor]] = []

    def bind_half_then_fail(entries: list[Any], views: list[Any]) -> None:
        if views and storage_ptr(views[0]) != storage_ptr(host.flat):  # binding the device block
            half = len(entries) // 2
            device_views.extend(weakref.ref(v) for v in views)
            real_bind(entries[:half], views[:half])
            raise torch.OutOfMemoryError("CUDA out of memory (injected after half the tensors)")
        real_bind(entries, views)

    monkeypatch.setattr(tm, "bind_views", bind_half_then_fail)
    gc.disable()
    try:
        with pytest.raises(torch.OutOfMemoryError) as failure:
            adapter.to_gpu()
        # The error is still held (the lifecycle keeps it as last_error), yet no device view is alive.
        assert failure.value is not None and device_views and all(r() is None for r in device_views)
    finally:
        gc.enable()
    assert adapter._device_flat is None and not adapter._on_device
    assert all(storage_ptr(t) == storage_ptr(host.flat) for _, t in iter_tensors(adapter.model) if t.numel())
    assert torch.equal(output(adapter), expected)  # the host copy still serves
    monkeypatch.setattr(tm, "bind_views", real_bind)
    adapter.to_gpu()
    assert torch.equal(output(adapter), expected)


def test_pinned_bytes_count_every_page_touched() -> None:
    assert locked_bytes(4096, 4096, 4096) == 4096
    assert locked_bytes(4096 + 64, 4096, 4096) == 2 * 4096  # an unaligned start spans two pages
    assert locked_bytes(65536 * 3 + 1, 10, 65536) == 65536  # 64 KiB pages (aarch64 kernels)
    assert locked_bytes(123, 0, 4096) == 0


async def test_lifecycle_keeps_the_host_copy_when_a_restore_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    from serve_app.core.lifecycle import Lifecycle
    from serve_app.errors import ModelLoadError

    adapter = TorchModuleAdapter(lambda device: Mixed().to(device), flat_moves_on_cpu=True)
    lifecycle = Lifecycle(model="mixed", adapter=adapter, device="cpu")
    async with lifecycle.use():
        expected = output(adapter)
    assert await lifecycle.offload() == "offloaded: cpu"
    assert lifecycle.footprint == Footprint(bytes_gpu=0, bytes_cpu=adapter._host.layout.nbytes)

    def fail(layout: Any, flat: Any) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    real_views = tm.build_views
    monkeypatch.setattr(tm, "build_views", lambda layout, flat: (
        real_views(layout, flat) if flat is adapter._host.flat else fail(layout, flat)))
    with pytest.raises(ModelLoadError, match="restore"):
        async with lifecycle.use():
            pass
    assert lifecycle.state.value == "cpu" and "restore failed" in (lifecycle.last_error or "")
    monkeypatch.setattr(tm, "build_views", real_views)
    async with lifecycle.use():  # the next request restores from the kept host copy
        assert torch.equal(output(adapter), expected)
    assert lifecycle.footprint.bytes_gpu == adapter._host.layout.nbytes


def test_release_drops_both_buffers() -> None:
    adapter = flat_adapter()
    adapter.to_cpu()
    host = weakref.ref(adapter._host)
    adapter.release()
    gc.collect()
    assert host() is None and adapter.model is None and adapter.footprint() == Footprint()


def test_real_causal_lm_round_trips_with_tied_embeddings(tmp_path: Path) -> None:
    from deployments.text_generation import Generator, SamplingParams, load_causal_lm
    from tests.textmodel import build_tiny_causal_lm

    path = str(build_tiny_causal_lm(tmp_path / "gpt2", arch="gpt2"))  # GPT-2 ties its embeddings
    adapter = TorchModuleAdapter(
        lambda d: load_causal_lm(path, d), module_of=lambda lm: lm.model, flat_moves_on_cpu=True
    )
    adapter.load("cpu")
    model = adapter.model.model
    assert model.lm_head.weight is model.transformer.wte.weight
    gen = Generator(adapter, max_new_tokens=8)
    params = SamplingParams.from_request({"max_tokens": 8, "temperature": 0})
    first = gen.generate("the weights move", params).text
    for _ in range(3):
        adapter.to_cpu()
        adapter.to_gpu()
        assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
        assert gen.generate("the weights move", params).text == first


# --- refused at load -----------------------------------------------------------------------------


def refusal(module: nn.Module, device: str = "cpu", obj: Any = None) -> str:
    with pytest.raises(UnsupportedLayout) as info:
        check_movable(module if obj is None else obj, module, device)
    return str(info.value)


def test_plain_modules_are_movable() -> None:
    check_movable(Mixed(), Mixed(), "cpu")


def test_device_map_and_accelerate_hooks_are_refused() -> None:
    module = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    module.hf_device_map = {"0": 0, "1": "cpu"}  # what from_pretrained(device_map=...) sets
    assert "device_map" in refusal(module)
    hooked = nn.Sequential(nn.Linear(2, 2))
    hooked[0]._hf_hook = object()  # what accelerate's add_hook_to_module sets
    assert "0 has an accelerate hook" in refusal(hooked)


def test_meta_tensors_are_refused() -> None:
    with torch.device("meta"):
        module = nn.Linear(4, 4)
    assert "weight is a meta tensor" in refusal(module)


def test_quantization_state_is_refused() -> None:
    module = nn.Linear(4, 4)
    with warnings.catch_warnings():  # torch deprecates its own quantized dtypes; loaders still make them
        warnings.simplefilter("ignore", UserWarning)
        packed = torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8)
    module.register_buffer("packed", packed)
    assert "packed holds quantization state" in refusal(module)

    class Params4bit(nn.Parameter):  # the shape of bitsandbytes' 4-bit parameter
        pass

    subclassed = nn.Linear(4, 4)
    subclassed.weight = Params4bit(torch.randn(4, 4))
    assert "weight is a Params4bit" in refusal(subclassed)
    quantized = nn.Linear(4, 4)
    quantized.hf_quantizer = object()
    assert "quantization state" in refusal(quantized)


def test_compiled_modules_and_cuda_graphs_are_refused() -> None:
    assert "compiled" in refusal(torch.compile(nn.Linear(2, 2)))
    module = nn.Linear(2, 2)
    module.graph = type("CUDAGraph", (), {})()  # torch.cuda.CUDAGraph cannot be built without CUDA
    assert "graph is a captured CUDA graph" in refusal(module)


def test_tensors_off_the_target_device_are_refused() -> None:
    assert "weight is on cpu, not cuda:0" in refusal(nn.Linear(2, 2), "cuda:0")


def test_load_refuses_and_leaves_nothing_behind() -> None:
    def split(device: str) -> nn.Module:
        module = nn.Linear(2, 2)
        module.hf_device_map = {"": "disk"}
        return module

    adapter = TorchModuleAdapter(split)
    with pytest.raises(UnsupportedLayout, match="cannot move this model"):
        adapter.load("cpu")
    assert adapter.model is None and adapter.footprint() == Footprint()
