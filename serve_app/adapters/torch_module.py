"""Adapter for torch modules (sentence-transformers, transformers causal LMs).

Offload copies every parameter and buffer into pinned host buffers that are allocated on the
first offload and reused afterwards, then points the module at them, so the GPU copies can be
freed. Restore copies back with non-blocking transfers from that pinned memory and
synchronizes once: the cost is the copy itself, not a reload. Pinned buffers are a CUDA-only
path (`pin_memory` raises without an accelerator); on the CPU the weights stay where they are
and only the tier is recorded.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from serve_app.adapters import Footprint

logger = logging.getLogger("serve_app.adapters.torch")

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class TorchModuleAdapter:
    """Wraps whatever `loader(device)` returns; `module_of` finds its `torch.nn.Module`."""

    def __init__(
        self,
        loader: Callable[[str], Any],
        *,
        weights_path: str | None = None,
        module_of: Callable[[Any], Any] = lambda obj: obj,
    ) -> None:
        self._loader = loader
        self._module_of = module_of
        self._weights_path = weights_path
        self.model: Any = None
        self.device = "cpu"
        self._on_device = False
        self._host: dict[int, Any] | None = None  # pinned host buffers, keyed by tensor slot

    # --- the ModelAdapter interface --------------------------------------------------------

    def load(self, device: str) -> None:
        self.device = device
        quiet_progress_bars()
        try:
            self.model = self._loader(device)
        except BaseException:
            self.release()
            raise
        self._on_device = True

    def to_cpu(self) -> None:
        if not self._on_device:
            return
        if self._is_cuda:
            import torch

            slots = list(self._tensor_slots())
            if self._host is None:
                self._host = {
                    i: torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
                    for i, (_, t) in enumerate(slots)
                }
            for i, (_, t) in enumerate(slots):
                self._host[i].copy_(t, non_blocking=True)
            torch.cuda.synchronize(self.device)
            for i, (owner, _) in enumerate(slots):
                owner(self._host[i])
            # The copy loop's `t` still names the last GPU tensor: without dropping it, its block
            # survives empty_cache() and stays reserved (used, to NVML) after the offload.
            del slots
            t = None
            gc.collect()
            torch.cuda.empty_cache()
        self._on_device = False

    def to_gpu(self) -> None:
        if self._on_device:
            return
        if self._is_cuda:
            import torch

            assert self._host is not None, "restore without an offload"
            slots = list(self._tensor_slots())
            moved = []
            try:
                for i, _ in enumerate(slots):
                    moved.append(self._host[i].to(self.device, non_blocking=True))
                torch.cuda.synchronize(self.device)
            except BaseException:
                # Roll back: drop the partial GPU copies, the module still points at host memory.
                del moved
                gc.collect()
                torch.cuda.empty_cache()
                raise
            for (owner, _), gpu_tensor in zip(slots, moved, strict=True):
                owner(gpu_tensor)
        self._on_device = True

    def release(self) -> None:
        self.model = None
        self._host = None
        self._on_device = False
        gc.collect()
        if self._is_cuda:
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.empty_cache()

    def footprint(self) -> Footprint:
        if self.model is None:
            return Footprint()
        total = sum(t.numel() * t.element_size() for _, t in self._tensor_slots())
        pinned = 0
        if self._host is not None:
            pinned = sum(t.numel() * t.element_size() for t in self._host.values())
        if self._on_device:
            return Footprint(bytes_gpu=total, bytes_cpu=pinned)
        return Footprint(bytes_gpu=0, bytes_cpu=max(total, pinned))

    def weights_bytes(self) -> int | None:
        return weights_size(self._weights_path)

    # --- helpers ---------------------------------------------------------------------------

    @property
    def _is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    def _tensor_slots(self) -> Iterator[tuple[Callable[[Any], None], Any]]:
        """Yield (setter, tensor) for every distinct parameter and buffer, in a stable order.

        Tied weights are one Parameter object, so `named_parameters()` yields them once and
        one assignment to `.data` moves every user of the tie.
        """
        module = self._module_of(self.model)
        for _, param in module.named_parameters():
            yield (lambda new, p=param: setattr(p, "data", new)), param.data
        for mod in module.modules():
            for name, buf in mod.named_buffers(recurse=False):
                if buf is not None:
                    yield (lambda new, m=mod, n=name: m._buffers.__setitem__(n, new)), buf


def weights_size(path: str | None) -> int | None:
    """Bytes of weight files under `path` (a file or a directory), or None when unknown."""
    if not path:
        return None
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    if not p.is_dir():
        return None
    files = [f for f in p.rglob("*") if f.is_file() and f.suffix in WEIGHT_SUFFIXES]
    # A checkpoint often ships the same weights twice (safetensors and .bin): count one format.
    for suffix in WEIGHT_SUFFIXES:
        chosen = [f for f in files if f.suffix == suffix]
        if chosen:
            return sum(f.stat().st_size for f in chosen)
    return None


def quiet_progress_bars() -> None:
    """Model libraries draw progress bars on load; in a server they are log noise."""
    try:
        import transformers

        transformers.logging.disable_progress_bar()
    except ImportError:
        pass
