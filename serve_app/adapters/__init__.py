"""Model adapters: the one interface the lifecycle uses to move weights between tiers.

Each adapter wraps one model library (torch modules, CTranslate2). All methods are blocking
and are called from a worker thread by the lifecycle, never concurrently with each other.
Heavy libraries are imported inside the methods, so importing this package stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class Footprint:
    bytes_gpu: int = 0
    bytes_cpu: int = 0


@runtime_checkable
class ModelAdapter(Protocol):
    #: The device the model serves from once loaded ("cuda:0" or "cpu").
    device: str

    def load(self, device: str) -> None:
        """Read weights onto `device`. On failure, free what was allocated and raise."""

    def to_cpu(self) -> None:
        """Move the weights to host memory (a no-op move when `device` is the CPU)."""

    def to_gpu(self) -> None:
        """Move the weights back to `device`. On failure, leave the CPU copy intact and raise."""

    def release(self) -> None:
        """Drop every reference to the weights and return their memory."""

    def footprint(self) -> Footprint:
        """Bytes the weights hold now, per tier."""

    def weights_bytes(self) -> int | None:
        """Size of the weight files on disk, when known, for estimates before the first load."""
