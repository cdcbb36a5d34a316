"""The router's event journal: what `/gpu/events`, the status page and the metrics hear.

Replicas send the lifecycle transitions they made since their last report with each
heartbeat (a report can be later than a transition, and a fast load passes through
`loading` between two reports, so the router cannot infer transitions from states). The
router adds its own decisions that changed something. Readers long-poll `wait_since`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from serve_app.core.events import DecisionFilter, Event, EventLog, humanise_bytes, reason_category

logger = logging.getLogger("serve_app.cluster.router")


class Journal:
    def __init__(self, capacity: int = 2000, wall: Callable[[], float] = time.time) -> None:
        self.log = EventLog(capacity)
        self.filter = DecisionFilter()
        self.wall = wall
        self.metrics: Any = None
        self._changed = asyncio.Event()

    def _add(self, event: Event) -> None:
        self.log.append(event)
        self._changed.set()

    def transitions(self, info: dict[str, Any]) -> None:
        """Record (and remove from `info`) the transitions a replica's report carries."""
        gpus = info.get("gpus") or []
        for t in info.pop("transitions", None) or ():
            event = Event(
                kind="transition", at=float(t.get("at") or self.wall()), model=info["model"],
                replica=info.get("replica"), gpu=gpus[0] if gpus else None, from_state=t.get("from"),
                to_state=t.get("to"), reason=str(t.get("reason") or ""), seconds=t.get("seconds"),
                bytes=t.get("bytes"),
            )
            self._add(event)
            if self.metrics is not None and event.move is not None and event.seconds is not None:
                tags = {"model": event.model, "move": event.move}
                self.metrics.transition_seconds.observe(float(event.seconds), tags)

    def decision(
        self, action: str, model: str, replica: str | None, reason: str, *, request_id: str | None = None,
        gpu: str | None = None, bytes: int | None = None, kind: str | None = None,
    ) -> None:
        """Record a decision that changed something (a repeated wait is dropped) and log it once."""
        if not self.filter.changed(action, request_id, reason):
            return
        self._add(Event(kind="decision", at=self.wall(), model=model, replica=replica, gpu=gpu, action=action,
                        reason=reason, bytes=bytes))
        what = f"{action} ({kind})" if kind else action
        size = f", {humanise_bytes(bytes)}" if bytes else ""
        logger.info("Router decision: %s model %r%s%s: %s", what, model, f" on {gpu}" if gpu else "", size, reason)
        if action == "evict" and self.metrics is not None:
            self.metrics.evictions_by_reason.inc(
                1, {"model": model, "kind": kind or "offload", "reason": reason_category(reason)}
            )

    def recent(self, model: str, since_wall: float) -> list[dict[str, Any]]:
        """`model`'s events since a wall-clock time, oldest first (what a slow request waited on)."""
        events, _ = self.log.since(0, limit=self.log.last_seq or 1)
        return [e.as_dict() for e in events if e.model == model and e.at >= since_wall]

    def forget(self, live_requests: Any) -> None:
        self.filter.forget(live_requests)

    async def wait_since(self, seq: int, timeout_s: float, limit: int = 500) -> dict[str, Any]:
        """Events after `seq`; waits up to `timeout_s` for the first one. `missed`: events that
        left the ring before this reader got them. A reader ahead of the log (the router
        restarted and numbers from 1 again) gets the ring from the start."""
        if seq > self.log.last_seq:
            seq = 0
        if seq >= self.log.last_seq:
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=timeout_s)
        events, missed = self.log.since(seq, limit)
        return {"last_seq": self.log.last_seq, "missed": missed, "events": [e.as_dict() for e in events]}
