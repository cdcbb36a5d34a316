"""Hindsight for the live policy: Belady-Size over the same requests and capacity.

Pure functions of plain request lists. The router feeds them a window of its trace ring (see
`serve_app/core/trace.py`) and shows the result as ``policy_audit`` in ``/gpu/status``.

* :func:`belady_misses` replays requests against one pool of `capacity_bytes` with instant loads,
  evicting the model whose next request is furthest away. With variable sizes that is a strong
  reference, not the exact optimum (finding that is NP-hard).
* :func:`belady_lower_bound` is a flow-style lower bound (PFOO-L, Berger et al. 2018): each gap
  between two requests of a model is a hit only if the model stays resident through it, which
  costs ``bytes * gap`` of the ``capacity * span`` byte-seconds there are. Keeping the cheapest gaps
  first maximises the hits any policy could get; the rest are misses, plus the first request of
  each model.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["PolicyAudit", "audit", "belady_lower_bound", "belady_misses"]

#: (time_s, model, bytes): one request.
Req = tuple[float, str, int]


def _next_uses(requests: Sequence[Req]) -> list[float]:
    nxt: list[float] = [math.inf] * len(requests)
    last: dict[str, float] = {}
    for i in range(len(requests) - 1, -1, -1):
        t, model, _ = requests[i]
        nxt[i] = last.get(model, math.inf)
        last[model] = t
    return nxt


def belady_misses(requests: Sequence[Req], capacity_bytes: int, resident: Iterable[str] = ()) -> int:
    """Misses of Belady-Size on `requests` (sorted by time), starting with `resident` on the GPU.

    A model larger than the whole capacity misses on every request (it can never stay).
    """
    nxt = _next_uses(requests)
    sizes = {m: b for _, m, b in requests}
    first = {}
    for i, (_, m, _) in enumerate(requests):
        first.setdefault(m, i)
    cache: dict[str, float] = {}  # model -> its next use
    used = 0
    for m in resident:
        if m in sizes and m not in cache and used + sizes[m] <= capacity_bytes:
            cache[m] = requests[first[m]][0]
            used += sizes[m]
    misses = 0
    for i, (_, model, size) in enumerate(requests):
        if model in cache:
            cache[model] = nxt[i]
            continue
        misses += 1
        if size > capacity_bytes:
            continue
        if used + size > capacity_bytes:
            # Furthest next use first; a heap per miss is cheaper than keeping one ordered.
            heap = [(-at, m) for m, at in cache.items()]
            heapq.heapify(heap)
            while used + size > capacity_bytes and heap:
                _, victim = heapq.heappop(heap)
                used -= sizes[victim]
                del cache[victim]
        cache[model] = nxt[i]
        used += size
    return misses


def belady_lower_bound(requests: Sequence[Req], capacity_bytes: int) -> int:
    """A lower bound on the misses of any policy with `capacity_bytes` (see the module doc)."""
    if not requests:
        return 0
    span = max(requests[-1][0] - requests[0][0], 1e-9)
    budget = capacity_bytes * span
    last: dict[str, float] = {}
    gaps: list[float] = []
    for t, model, size in requests:
        if model in last:
            gaps.append(size * max(t - last[model], 0.0))
        last[model] = t
    gaps.sort()
    kept = 0
    for cost in gaps:
        if cost > budget:
            break
        budget -= cost
        kept += 1
    return len(requests) - kept


@dataclass(frozen=True, slots=True)
class PolicyAudit:
    window_s: float
    gpu_misses: int
    belady_misses: int
    requests: int

    @property
    def ratio(self) -> float | None:
        """Live misses over Belady's; None when Belady has none to compare with."""
        if self.belady_misses == 0:
            return None if self.gpu_misses == 0 else math.inf
        return self.gpu_misses / self.belady_misses

    def as_dict(self) -> dict[str, float | int | None]:
        ratio = self.ratio
        return {
            "window_s": round(self.window_s, 1),
            "gpu_misses": self.gpu_misses,
            "belady_misses": self.belady_misses,
            "ratio": None if ratio is None or math.isinf(ratio) else round(ratio, 3),
            "requests": self.requests,
        }


def audit(
    requests: Sequence[Req], gpu_misses: int, capacity_bytes: int, window_s: float, resident: Iterable[str] = ()
) -> PolicyAudit:
    """The live policy's `gpu_misses` against Belady-Size's on the same `requests` and capacity."""
    return PolicyAudit(window_s, gpu_misses, belady_misses(requests, capacity_bytes, resident), len(requests))
