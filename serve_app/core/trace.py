"""The router's traffic record: a bounded ring of request arrivals and weight moves.

Pure data (times come from the caller's clock). It is what `GET /gpu/trace` and
`GET /gpu/trace/models` export, in the simulator's formats (`bench/policy_sim.py`), so an operator
can replay their own traffic offline against other timeouts and budgets; and it is the window the
self-audit (`serve_app/core/audit.py`) compares the live policy with Belady-Size over.

A request's bytes are the model's footprint as known when it arrived; a model's first request
arrives before its first load measured anything, so exports fill unknown (0) bytes with the
latest footprint seen for that model.
"""

from __future__ import annotations

import bisect
import csv
import io
import math
import statistics
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from serve_app.core.audit import PolicyAudit, audit
from serve_app.core.cost import guess_load_s, guess_restore_s

__all__ = ["MODELS_HEADER", "TRACE_HEADER", "Move", "RequestRecord", "TraceRing"]

TRACE_HEADER = ("time_s", "model", "bytes", "duration_s")
MODELS_HEADER = ("model", "bytes", "cold_load_s", "restore_s")
#: Moves that put a model on a GPU: each one is a GPU miss.
MISS_KINDS = frozenset({"load", "restore"})


@dataclass(frozen=True, slots=True)
class RequestRecord:
    at: float
    model: str
    bytes: int
    duration_s: float


@dataclass(frozen=True, slots=True)
class Move:
    """A load, restore, offload or release that finished, with its measured seconds."""

    at: float
    model: str
    kind: str
    seconds: float
    bytes: int


def _at(record: RequestRecord) -> float:
    return record.at


class TraceRing:
    """The last `capacity` request arrivals and the last `capacity` moves."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        #: Sorted by arrival: replicas report a little after the fact and not in order.
        self.requests: list[RequestRecord] = []
        self.moves: deque[Move] = deque(maxlen=capacity)
        #: Latest footprint seen per model (fills requests recorded before their first load).
        self.model_bytes: dict[str, int] = {}
        #: The ring is complete from here on: the time of the newest record it had to drop.
        self.complete_since = -math.inf

    def add_request(self, at: float, model: str, bytes_: int, duration_s: float) -> None:
        if self.capacity <= 0:
            return
        if bytes_ > 0:
            self.model_bytes[model] = bytes_
        record = RequestRecord(at, model, int(bytes_), max(0.0, duration_s))
        if self.requests and self.requests[-1].at > at:
            bisect.insort(self.requests, record, key=_at)  # a memmove, not a sort of the ring
        else:
            self.requests.append(record)
        if len(self.requests) > self.capacity:
            dropped = self.requests.pop(0)
            self.complete_since = max(self.complete_since, dropped.at)

    def add_move(self, at: float, model: str, kind: str, seconds: float, bytes_: int) -> None:
        if self.capacity <= 0:
            return
        if bytes_ > 0:
            self.model_bytes[model] = bytes_
        if len(self.moves) == self.capacity:
            self.complete_since = max(self.complete_since, self.moves[0].at)
        self.moves.append(Move(at, model, kind, max(0.0, seconds), int(bytes_)))

    def _bytes(self, r: RequestRecord) -> int:
        return r.bytes or self.model_bytes.get(r.model, 0)

    # --- exports -------------------------------------------------------------------------

    def requests_csv(self) -> str:
        """`time_s,model,bytes,duration_s`, times in seconds from the first kept request."""
        out = io.StringIO()
        w = csv.writer(out, lineterminator="\n")
        w.writerow(TRACE_HEADER)
        origin = self.requests[0].at if self.requests else 0.0
        for r in self.requests:
            w.writerow((f"{r.at - origin:.3f}", r.model, self._bytes(r), f"{r.duration_s:.3f}"))
        return out.getvalue()

    def models_csv(self, models: Iterable[str] = ()) -> str:
        """`model,bytes,cold_load_s,restore_s`: medians of the measured moves, else the guesses
        the policy itself uses (`serve_app/core/cost.py`)."""
        loads: dict[str, list[float]] = {}
        restores: dict[str, list[float]] = {}
        for m in self.moves:
            if m.kind == "load":
                loads.setdefault(m.model, []).append(m.seconds)
            elif m.kind == "restore":
                restores.setdefault(m.model, []).append(m.seconds)
        names = sorted({*models, *self.model_bytes, *(r.model for r in self.requests)})
        out = io.StringIO()
        w = csv.writer(out, lineterminator="\n")
        w.writerow(MODELS_HEADER)
        for name in names:
            size = self.model_bytes.get(name, 0)
            cold = statistics.median(loads[name]) if name in loads else guess_load_s(size)
            restore = statistics.median(restores[name]) if name in restores else guess_restore_s(size)
            w.writerow((name, size, f"{cold:.4f}", f"{restore:.4f}"))
        return out.getvalue()

    # --- the self-audit ------------------------------------------------------------------

    def resident_at(self, at: float) -> list[str]:
        """Models on a GPU at time `at`, as far as the kept moves tell."""
        on: dict[str, None] = {}
        for m in self.moves:
            if m.at >= at:
                break
            if m.kind in MISS_KINDS:
                on[m.model] = None
            else:
                on.pop(m.model, None)
        return list(on)

    def audit(
        self, now: float, window_s: float, capacity_bytes: int, groups: Sequence[tuple[int, Iterable[str]]] = ()
    ) -> PolicyAudit:
        """The live misses of the last `window_s` against Belady-Size's on the same requests.

        Belady starts with what the live policy had on its GPUs when the window opened, so both
        count the same misses: those the window's own requests caused. `groups` splits the models
        by the GPU their replicas were given, `(capacity, models)` each: a replica cannot use
        another GPU, so neither may Belady; models in no group share `capacity_bytes`.
        """
        since = max(now - window_s, self.complete_since)  # not further back than the ring is whole
        requests = [(r.at, r.model, self._bytes(r)) for r in self.requests if r.at >= since]
        misses = sum(1 for m in self.moves if m.at >= since and m.kind in MISS_KINDS)
        resident = self.resident_at(since)
        window = max(0.0, now - since)
        grouped: set[str] = set()
        belady = 0
        for capacity, models in groups:
            names = set(models) - grouped
            grouped |= names
            part = [r for r in requests if r[1] in names]
            belady += audit(part, 0, capacity, window, [m for m in resident if m in names]).belady_misses
        rest = [r for r in requests if r[1] not in grouped]
        if rest or not groups:
            belady += audit(rest, 0, capacity_bytes, window, [m for m in resident if m not in grouped]).belady_misses
        return PolicyAudit(window, misses, belady, len(requests))
