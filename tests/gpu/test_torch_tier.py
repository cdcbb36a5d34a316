"""The torch adapter on a real GPU, strict enough that a model-sized leak fails.

Two families, each at least 512 MiB of weights: a GPT-2 causal LM (tied embeddings) and a BERT
sentence-transformers encoder, both random weights from a config. Every move and every
inference runs in `asyncio.to_thread`, as the service runs them, for 5 cycles. NVML is read by
the UUID of cuda:0. The baseline is taken after one warm-up cycle of the same model: CUDA
loads kernels and its context lazily and never unloads them, which no release can give back.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from tests.gpu.tier import (
    CYCLES,
    DEVICE,
    GPU_ONLY,
    MIN_MODEL_BYTES,
    OFFLOAD_DROP,
    RELEASE_SLACK_BYTES,
    Loop,
    MiB,
    build_gpt2,
    build_sentence_transformer,
    cuda0_uuid,
    load_sentence_transformer,
    nvml_used,
)

pytestmark = GPU_ONLY


@pytest.fixture(scope="module", autouse=True)
def _torch_has_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA (the CPU build is installed)")


@pytest.fixture(scope="module")
def gpt2_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(build_gpt2(tmp_path_factory.mktemp("gpt2"), 640 * MiB))


@pytest.fixture(scope="module")
def st_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(build_sentence_transformer(tmp_path_factory.mktemp("bert")))


class Family:
    """How to build one family's adapter, run it, and mutate one of its weights."""

    def __init__(self, kind: str, path: str) -> None:
        from deployments.text_generation import Generator, SamplingParams, load_causal_lm
        from serve_app.adapters.torch_module import TorchModuleAdapter

        self.kind = kind
        if kind == "gpt2":
            self.adapter = TorchModuleAdapter(
                lambda d: load_causal_lm(path, d, "float32"), module_of=lambda lm: lm.model
            )
            gen = Generator(self.adapter, max_new_tokens=12)
            params = SamplingParams.from_request({"max_tokens": 12, "temperature": 0})
            self.infer: Callable[[], Any] = lambda: gen.generate("the weights move", params).text
        else:
            self.adapter = TorchModuleAdapter(lambda d: load_sentence_transformer(path, d))
            texts = ["GPU memory, managed", "offload and restore", "a third sentence"]
            self.infer = lambda: self.adapter.model.encode(texts, convert_to_numpy=True, show_progress_bar=False)

    @property
    def module(self) -> Any:
        return self.adapter.model.model if self.kind == "gpt2" else self.adapter.model

    def mutable_weight(self) -> Any:
        m = self.module
        return m.transformer.wte.weight if self.kind == "gpt2" else m[0].auto_model.embeddings.word_embeddings.weight


def same(a: Any, b: Any) -> bool:
    return bool(np.array_equal(a, b)) if isinstance(a, np.ndarray) else a == b


def settle() -> None:
    import torch

    gc.collect()
    torch.cuda.synchronize()


@pytest.mark.parametrize("kind", ["gpt2", "sentence-transformers"])
def test_cycles_free_vram_keep_outputs_and_release_to_baseline(
    kind: str, gpt2_path: str, st_path: str, run: Loop
) -> None:
    import torch

    from serve_app.adapters import torch_module as tm

    uuid = cuda0_uuid()
    path = gpt2_path if kind == "gpt2" else st_path

    warm = Family(kind, path)  # loads every kernel and handle the measured run will use
    run(warm.adapter.load, DEVICE)
    run(warm.infer)
    run(warm.adapter.to_cpu)
    run(warm.adapter.to_gpu)
    run(warm.infer)
    run(warm.adapter.release)
    del warm
    settle()
    baseline = nvml_used(uuid)

    fam = Family(kind, path)
    run(fam.adapter.load, DEVICE)
    weights = fam.adapter.footprint().bytes_gpu
    assert weights >= MIN_MODEL_BYTES, f"{kind} has only {weights / MiB:.0f} MiB of weights"
    expected = run(fam.infer)
    for cycle in range(CYCLES):
        settle()
        loaded = nvml_used(uuid)
        assert loaded - baseline >= weights, "NVML does not see the weights at all"
        run(fam.adapter.to_cpu)
        dropped = loaded - nvml_used(uuid)
        assert dropped >= OFFLOAD_DROP * weights, (
            f"cycle {cycle}: offload freed {dropped / MiB:.0f} MiB of {weights / MiB:.0f} MiB"
        )
        host = fam.adapter._host
        page = tm._page_size()
        assert host is not None and host.layout.nbytes <= host.pinned_bytes <= host.layout.nbytes + 2 * page
        assert fam.adapter.footprint().bytes_cpu == host.pinned_bytes
        assert all(t.is_pinned() for t in fam.module.parameters())
        run(fam.adapter.to_gpu)
        assert all(t.device.type == "cuda" for t in fam.module.parameters())
        assert same(run(fam.infer), expected), f"cycle {cycle}: outputs changed after a restore"
        if cycle == 2:
            # A weight changed on the GPU must survive the next offload: the host buffer is
            # refreshed by every offload, not reused as it was.
            weight = fam.mutable_weight()
            with torch.no_grad():
                weight[7].add_(0.5)
            mutated = weight.detach().cpu().clone()
            expected = run(fam.infer)
        if cycle == 3:
            assert torch.equal(fam.mutable_weight().detach().cpu(), mutated)
    run(fam.adapter.release)
    settle()
    left = nvml_used(uuid) - baseline
    assert left <= RELEASE_SLACK_BYTES, f"{left / MiB:.0f} MiB still used after release"


def test_tied_embeddings_stay_tied(gpt2_path: str, run: Loop) -> None:
    fam = Family("gpt2", gpt2_path)
    run(fam.adapter.load, DEVICE)
    for _ in range(2):
        run(fam.adapter.to_cpu)
        m = fam.module
        assert m.lm_head.weight is m.transformer.wte.weight
        assert m.lm_head.weight.data_ptr() == m.transformer.wte.weight.data_ptr()
        run(fam.adapter.to_gpu)
        assert m.lm_head.weight.data_ptr() == m.transformer.wte.weight.data_ptr()
        assert m.lm_head.weight.device.type == "cuda"
    run(fam.adapter.release)


def test_restore_uses_one_device_block_on_its_own_stream(gpt2_path: str, run: Loop) -> None:
    import torch

    fam = Family("gpt2", gpt2_path)
    run(fam.adapter.load, DEVICE)
    run(fam.adapter.to_cpu)
    run(fam.adapter.to_gpu)
    block = fam.adapter._device_flat
    storages = {t.untyped_storage().data_ptr() for t in [*fam.module.parameters(), *fam.module.buffers()]}
    assert storages == {block.untyped_storage().data_ptr()}
    assert all(t.data_ptr() % 16 == 0 for t in fam.module.parameters())
    assert fam.adapter._stream is not None and fam.adapter._stream != torch.cuda.default_stream(DEVICE)
    run(fam.adapter.release)


def test_oom_during_restore_rolls_back(gpt2_path: str, run: Loop, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from serve_app.adapters import torch_module as tm

    uuid = cuda0_uuid()
    fam = Family("gpt2", gpt2_path)
    run(fam.adapter.load, DEVICE)
    expected = run(fam.infer)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        logits = fam.module(ids.to(DEVICE)).logits.cpu()
    run(fam.adapter.to_cpu)
    host_before = {n: t.detach().clone() for n, t in list(fam.module.named_parameters())[:4]}

    def check_rolled_back(before: int) -> None:
        settle()
        assert abs(nvml_used(uuid) - before) <= 16 * MiB, "VRAM did not return to where it was"
        assert fam.adapter._device_flat is None
        assert all(t.device.type == "cpu" and t.is_pinned() for t in fam.module.parameters())
        for n, t in list(fam.module.named_parameters())[:4]:
            assert torch.equal(t, host_before[n])
        with torch.no_grad():  # the host copy still serves
            assert torch.allclose(fam.module(ids).logits, logits, atol=1e-3, rtol=1e-3)

    # 1. A real out-of-memory: leave less free than the weights need.
    settle()
    free, _total = torch.cuda.mem_get_info(DEVICE)
    blocker = torch.empty(free - fam.adapter._host.layout.nbytes // 2, dtype=torch.uint8, device=DEVICE)
    before = nvml_used(uuid)
    with pytest.raises(torch.OutOfMemoryError):
        run(fam.adapter.to_gpu)
    check_rolled_back(before)
    del blocker
    torch.cuda.empty_cache()

    # 2. Partway: the device block is allocated and filled, half the tensors are rebound, then OOM.
    real_bind = tm.bind_views
    host_ptr = fam.adapter._host.flat.untyped_storage().data_ptr()

    def bind_half_then_fail(entries: list[Any], views: list[Any]) -> None:
        if views and views[0].untyped_storage().data_ptr() != host_ptr:
            real_bind(entries[: len(entries) // 2], views[: len(views) // 2])
            raise torch.OutOfMemoryError("CUDA out of memory (injected after half the tensors)")
        real_bind(entries, views)

    settle()
    before = nvml_used(uuid)
    monkeypatch.setattr(tm, "bind_views", bind_half_then_fail)
    with pytest.raises(torch.OutOfMemoryError):
        run(fam.adapter.to_gpu)
    monkeypatch.setattr(tm, "bind_views", real_bind)
    check_rolled_back(before)

    run(fam.adapter.to_gpu)  # a later restore succeeds
    assert run(fam.infer) == expected
    run(fam.adapter.release)


def test_release_returns_pinned_memory(gpt2_path: str, run: Loop) -> None:
    import torch

    fam = Family("gpt2", gpt2_path)
    run(fam.adapter.load, DEVICE)
    run(fam.adapter.to_cpu)
    host = fam.adapter._host
    flat = host.flat
    assert flat.is_pinned() and host.pinned_bytes >= host.layout.nbytes
    run(fam.adapter.release)
    assert not flat.is_pinned()  # unregistered: the pages are ordinary memory again
    stats = torch.cuda.host_memory_stats() if hasattr(torch.cuda, "host_memory_stats") else {}
    reserved = [v for k, v in stats.items() if "reserved_bytes" in k and k.endswith("current")]
    assert all(v <= 64 * MiB for v in reserved), stats  # torch's own cached pinned blocks were returned


def test_a_model_loaded_with_a_device_map_is_refused(gpt2_path: str) -> None:
    pytest.importorskip("accelerate", reason="transformers needs accelerate for device_map")
    from transformers import AutoModelForCausalLM

    from serve_app.adapters.torch_module import TorchModuleAdapter, UnsupportedLayout

    adapter = TorchModuleAdapter(
        lambda d: AutoModelForCausalLM.from_pretrained(gpt2_path, device_map={"": d}, local_files_only=True)
    )
    with pytest.raises(UnsupportedLayout, match="device_map"):
        adapter.load(DEVICE)
    assert adapter.model is None
