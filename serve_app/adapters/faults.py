"""Fault injection for the torch load path: a simulated out-of-memory at a given byte count.

Off by default. A model's `fault_oom_at_bytes` (serve_app/config.py) arms it: while that
model loads, every parameter and buffer that lands on a module is counted (each storage once),
and the first one that takes the total past the budget raises `torch.OutOfMemoryError`, the
exception a real CUDA allocator raises, from inside the loader. So the failure happens mid-load
with part of the weights already allocated, and everything after it (the adapter's cleanup, the
lifecycle's 503 and `last_error`, the router's queue) runs exactly as for a real one.

Counted with torch's global module registration hooks, not a `TorchDispatchMode`: with
transformers 5.24, sentence-transformers builds modules on the meta device and the weights come
from safetensors outside the dispatcher, so a dispatch mode saw 12 KiB of an 87 MiB MiniLM load,
while the registration hooks saw all of it (105 tensors, 86.65 MiB).

The ledger keeps a weak reference to each counted tensor, so after the failed load has been
cleaned up it can say how many of those bytes are still alive (`held_bytes`): the measure of
"what the failed load allocated was freed" that does not depend on the C allocator returning
pages to the OS.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

MiB = 1024**2


@dataclass
class AllocationLedger:
    """What one armed load allocated, and how much of it is still alive."""

    limit_bytes: int
    allocated_bytes: int = 0
    tripped: bool = False
    _seen: set[int] = field(default_factory=set)
    _refs: list[tuple[weakref.ref[Any], int]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, tensor: Any) -> None:
        """Count `tensor`'s storage (once); raise the simulated OOM past the budget."""
        if tensor is None or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if not nbytes or self.tripped:
            return
        with self._lock:
            if ptr in self._seen:
                return
            self._seen.add(ptr)
            self.allocated_bytes += nbytes
            self._refs.append((weakref.ref(tensor), nbytes))
            over = self.allocated_bytes > self.limit_bytes
            if over:
                self.tripped = True
        if over:
            import torch

            raise torch.OutOfMemoryError(
                f"simulated out of memory: the load had allocated {self.allocated_bytes / MiB:.1f} MiB, "
                f"over fault_oom_at_bytes={self.limit_bytes} ({self.limit_bytes / MiB:.1f} MiB). "
                "This is fault injection: remove fault_oom_at_bytes from the model's config to load it"
            )

    def held_bytes(self) -> int:
        """Bytes of the counted tensors that are still alive somewhere."""
        return sum(nbytes for ref, nbytes in self._refs if ref() is not None)

    def report(self) -> dict[str, Any]:
        return {
            "kind": "simulated_oom",
            "limit_bytes": self.limit_bytes,
            "allocated_bytes": self.allocated_bytes,
            "tripped": self.tripped,
            "held_bytes": self.held_bytes(),
        }


@contextlib.contextmanager
def allocation_budget(limit_bytes: int) -> Iterator[AllocationLedger]:
    """Count what lands on modules inside the block; past `limit_bytes`, raise the simulated OOM.

    The hooks are process-wide; a replica loads one model at a time (adapter calls never run
    concurrently), so every tensor registered meanwhile belongs to this load, whichever thread
    the loader uses.
    """
    from torch.nn.modules.module import (
        register_module_buffer_registration_hook,
        register_module_parameter_registration_hook,
    )

    ledger = AllocationLedger(limit_bytes)

    def hook(_module: Any, _name: str, tensor: Any) -> None:
        ledger.count(tensor)

    handles = [register_module_parameter_registration_hook(hook), register_module_buffer_registration_hook(hook)]
    try:
        yield ledger
    finally:
        for handle in handles:
            handle.remove()
