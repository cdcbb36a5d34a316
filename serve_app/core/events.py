"""Operator events as plain records: lifecycle transitions and router decisions.

The router appends them to an `EventLog` (a bounded ring with sequence numbers); the ingress
reads it from a sequence number on and fans it out to `/gpu/events` clients, each through a
`DropBuffer`, so a slow client loses its oldest events (and is told how many) instead of
slowing anyone else. Everything here is pure: no Ray, no asyncio, the caller gives the time.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

#: Transition targets whose arrival ends a timed move, and the move's name.
MOVES = {("loading", "gpu"): "load", ("restoring", "gpu"): "restore", ("offloading", "cpu"): "offload",
         ("releasing", "unloaded"): "release"}


@dataclass(frozen=True, slots=True)
class Event:
    """One line of the stream. `kind` is "transition" (from/to set) or "decision" (action set)."""

    kind: str
    at: float  # wall-clock seconds (time.time), for display
    model: str
    replica: str | None = None
    gpu: str | None = None
    from_state: str | None = None
    to_state: str | None = None
    action: str | None = None  # decisions: admit, evict, wait, reject
    reason: str = ""
    seconds: float | None = None
    bytes: int | None = None
    seq: int = 0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["from"], d["to"] = d.pop("from_state"), d.pop("to_state")
        return {k: v for k, v in d.items() if v is not None}

    @property
    def move(self) -> str | None:
        """"load", "restore", "offload" or "release" when this transition ends one, else None."""
        if self.kind != "transition":
            return None
        return MOVES.get((self.from_state or "", self.to_state or ""))


class EventLog:
    """The last `capacity` events, numbered from 1; a reader behind the ring learns how many it missed."""

    def __init__(self, capacity: int = 1000) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self._ring: deque[Event] = deque(maxlen=capacity)
        self.last_seq = 0

    def append(self, event: Event) -> Event:
        self.last_seq += 1
        numbered = _replace_seq(event, self.last_seq)
        self._ring.append(numbered)
        return numbered

    def since(self, seq: int, limit: int = 500) -> tuple[list[Event], int]:
        """Events after `seq` (at most `limit`), and how many after `seq` already left the ring."""
        if not self._ring or seq >= self.last_seq:
            return [], 0
        first = self._ring[0].seq
        missed = max(0, first - seq - 1)
        start = max(seq + 1, first) - first
        out = [self._ring[i] for i in range(start, min(len(self._ring), start + limit))]
        return out, missed


def _replace_seq(event: Event, seq: int) -> Event:
    d = asdict(event)
    d["seq"] = seq
    return Event(**d)


class DropBuffer:
    """A bounded FIFO that never blocks its writer: when full, the oldest item goes and is counted."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self._items: deque[Any] = deque()
        self.capacity = capacity
        self.dropped = 0  # since the last `take_dropped`

    def put(self, item: Any) -> None:
        if len(self._items) >= self.capacity:
            self._items.popleft()
            self.dropped += 1
        self._items.append(item)

    def drain(self) -> list[Any]:
        out = list(self._items)
        self._items.clear()
        return out

    def take_dropped(self) -> int:
        n, self.dropped = self.dropped, 0
        return n

    def __len__(self) -> int:
        return len(self._items)


class DecisionFilter:
    """Passes a decision only when it changes something: every admit and evict, a wait only when
    its reason differs from the last one given for the same request (the policy re-decides every
    tick, and the same wait would otherwise flood the stream)."""

    def __init__(self) -> None:
        self._waits: dict[str, str] = {}

    def changed(self, action: str, request_id: str | None, reason: str) -> bool:
        if action != "wait" or request_id is None:
            if request_id is not None:
                self._waits.pop(request_id, None)
            return True
        if self._waits.get(request_id) == reason:
            return False
        self._waits[request_id] = reason
        return True

    def forget(self, live_requests: Iterable[str]) -> None:
        keep = set(live_requests)
        for rid in [r for r in self._waits if r not in keep]:
            del self._waits[rid]


def reason_category(reason: str) -> str:
    """A low-cardinality label for a metric: the policy's reasons carry numbers and ids."""
    text = reason.lower()
    if "release_timeout_s" in text:
        return "release_timeout"
    if "idle_timeout_s" in text or "after use" in text:
        return "idle_timeout"
    if "making room" in text:
        return "make_room"
    if "admin" in text:
        return "admin"
    return "other"


def humanise_bytes(n: int | None) -> str:
    if not n:
        return "0 B"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.0f} {unit}" if n / size >= 10 else f"{n / size:.1f} {unit}"
    return f"{n} B"
