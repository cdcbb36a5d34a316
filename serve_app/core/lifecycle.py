"""The model lifecycle: one per model instance in a replica.

States and legal moves live in `lifecycle_states.py` as a table. This module adds the
concurrency rules a server needs:

* requests hold a lease (`async with lifecycle.use()`); the in-flight count is exact;
* an offload or release asked while requests are in flight waits for the count to reach 0,
  so a request is never broken by a move;
* a request arriving while an offload is only *queued* cancels the offload; one arriving
  while a release is queued, or during `offloading`/`releasing`, waits and then restores
  or reloads;
* concurrent first requests cause exactly one load, and if that load fails, every request
  that waited on it gets the error (the next request tries again).

Blocking adapter calls run in a worker thread so the replica's event loop keeps serving
heartbeats and other requests while weights move.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from serve_app.adapters import Footprint, ModelAdapter
from serve_app.core.events import humanise_bytes
from serve_app.core.states import ALLOWED, IllegalTransition, ModelState
from serve_app.errors import ModelLoadError

logger = logging.getLogger("serve_app.core.lifecycle")
S = ModelState

#: Admission hook: awaited before a load ("load") or restore ("restore"); raises
#: `serve_app.errors.CapacityError` when the GPU has no room within the request timeout.
Admission = Callable[[str], Awaitable[None]]


@dataclass
class LifecyclePolicy:
    """Per-model knobs; mutable because runtime changes take effect at once."""

    idle_timeout_s: float | None = 300.0
    release_timeout_s: float | None = 1800.0
    offload_after_use: bool = False
    priority: int = 0
    pinned: bool = False

    @property
    def offloads_after_use(self) -> bool:
        return self.offload_after_use or self.idle_timeout_s == 0


@dataclass(frozen=True, slots=True)
class TransitionEvent:
    model: str
    old: ModelState
    new: ModelState
    reason: str
    at: float
    duration_s: float | None = None
    error: str | None = None


@dataclass
class _Timings:
    last_load_s: float | None = None
    last_restore_s: float | None = None
    last_offload_s: float | None = None
    last_release_s: float | None = None


@dataclass
class Lifecycle:
    model: str
    adapter: ModelAdapter
    device: str
    policy: LifecyclePolicy = field(default_factory=LifecyclePolicy)
    clock: Callable[[], float] = time.monotonic
    admit: Admission | None = None
    on_event: Callable[[TransitionEvent], None] | None = None
    #: Called with the in-flight count when it becomes 1 (busy) or 0 (idle).
    on_usage: Callable[[int], None] | None = None
    #: Where the weights go, for the logs (a GPU's id); the device when unset.
    location: str | None = None
    #: Bytes a load is expected to need, for the logs ("Loading model 'x' on GPU-1 (needs 90 MiB)").
    need_bytes: Callable[[], int | None] | None = None

    def __post_init__(self) -> None:
        self.state: ModelState = S.UNLOADED
        self.seq = 0  # transitions so far: lets the router tell a stale report from a new one
        self.in_flight = 0
        #: Open realtime sessions holding this instance resident (see `hold`).
        self.residents = 0
        self.last_used_at = self.clock()
        self.since = self.last_used_at
        self.reason = "created"
        self.last_error: str | None = None
        self.timings = _Timings()
        self.loads = 0  # loads from disk started: N concurrent first requests must make exactly one
        self.footprint = Footprint()
        self._cond = asyncio.Condition()
        self._busy: str | None = None  # the transition running: "load", "restore", "offload", "release"
        self._pending: str | None = None  # a queued "offload" or "release" waiting for in_flight == 0
        self._waiters = 0  # requests waiting for the model to become usable
        self._attempt = 0
        self._failed_attempt = -1
        self._failed_error: BaseException | None = None
        self._after_use_task: asyncio.Task[str] | None = None
        #: Finished moves by kind ("load", "restore", "offload", "release"): the router turns
        #: increments into trace records with the matching `last_*_s` seconds.
        self.moves: dict[str, int] = {"load": 0, "restore": 0, "offload": 0, "release": 0}
        #: Requests since the router last took them (`take_requests`): (arrived_at, held_s).
        #: Bounded: a replica cut off from the router keeps the newest.
        self.request_log: deque[tuple[float, float]] = deque(maxlen=4096)

    # --- requests ------------------------------------------------------------------------

    @asynccontextmanager
    async def use(self, *, record: bool = True, arrivals: Sequence[float] | None = None) -> AsyncIterator[None]:
        """Hold the model on its serving device for the body of the block (`record`: a request,
        logged for the router's trace; a preheat is not). `arrivals`: the block serves several
        requests at once (a batch), each logged with its own arrival time (by `clock`)."""
        arrived = self.clock()
        times = (arrived,) if arrivals is None else tuple(arrivals)
        try:
            await self._acquire()
        except BaseException:
            if record:
                self.request_log.extend((at, 0.0) for at in times)  # demand all the same: the trace keeps it
            raise
        started = self.clock()
        try:
            yield
        finally:
            if record:
                held = self.clock() - started
                self.request_log.extend((at, held) for at in times)
            await self._release_lease()

    @asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        """Keep the model resident for a long session (a realtime stream) without a lease.

        A lease would make an admin offload or release wait for the session's end (minutes); a
        hold makes them answer at once with "skipped", and keeps idle timeouts and evictions
        away until the last hold ends, from which the idle time then counts. Entering loads or
        restores the model like a request. The session's own work still takes leases.
        """
        await self._acquire()
        self.residents += 1  # no await since the lease was taken: no offload can slip in between
        try:
            await self._release_lease()
            self._usage_changed(force=True)
            yield
        finally:
            self.residents -= 1
            self.last_used_at = self.clock()
            self._usage_changed(force=True)
            if self.residents == 0 and self.in_flight == 0 and self.policy.offloads_after_use:
                with contextlib.suppress(RuntimeError):
                    self._after_use_task = asyncio.get_running_loop().create_task(self.offload("offload after use"))

    def _resident_refusal(self) -> str | None:
        if self.residents:
            return f"skipped: {self.residents} open realtime session(s) keep the model resident"
        return None

    def take_requests(self) -> list[tuple[float, float]]:
        """The requests logged since the last call, oldest first: (arrived_at, held_s)."""
        out = list(self.request_log)
        self.request_log.clear()
        return out

    async def _acquire(self) -> None:
        waited_on: int | None = None
        async with self._cond:
            self._waiters += 1
            try:
                if self._pending == "offload":
                    self._pending = None  # a request arrived: the queued offload is cancelled
                    self._cond.notify_all()
                while True:
                    if waited_on is not None and self._failed_attempt >= waited_on:
                        assert self._failed_error is not None
                        raise self._failed_error
                    if self._busy is not None or self._pending == "release":
                        if self._busy in ("load", "restore"):
                            waited_on = self._attempt
                        await self._cond.wait()
                        continue
                    if self.state is S.GPU:
                        self.in_flight += 1
                        self._usage_changed()
                        return
                    kind = "load" if self.state is S.UNLOADED else "restore"
                    self._busy = kind
                    self._attempt += 1
                    attempt = self._attempt
                    break
            finally:
                self._waiters -= 1
        # The transition runs outside the lock so others can queue and heartbeats go on. It is
        # shielded: if this request is cancelled (client gone), the move still finishes for the
        # requests queued behind it, and no release can overlap a load still in its thread.
        task = asyncio.ensure_future(self._bring_up(kind))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                await self._finish_bring_up(attempt, task, take_lease=False)
            else:
                task.add_done_callback(
                    lambda t: asyncio.ensure_future(self._finish_bring_up(attempt, t, take_lease=False))
                )
            raise
        except BaseException:
            pass  # reported below, to this request and to those that waited on it
        await self._finish_bring_up(attempt, task, take_lease=True)

    async def _finish_bring_up(self, attempt: int, task: asyncio.Future[None], *, take_lease: bool) -> None:
        exc: BaseException | None = asyncio.CancelledError() if task.cancelled() else task.exception()
        async with self._cond:
            self._busy = None
            if exc is not None:
                self._failed_attempt, self._failed_error = attempt, exc
            elif take_lease:
                self.in_flight += 1  # taken in the same critical section: no offload can slip in
                self._usage_changed()
            self._cond.notify_all()
        if exc is not None and take_lease:
            raise exc

    def _usage_changed(self, force: bool = False) -> None:
        """Tell the observer when the model goes busy or idle (edges only, not every request)."""
        if self.on_usage is not None and (force or self.in_flight in (0, 1)):
            try:
                self.on_usage(self.in_flight)
            except Exception:
                logger.exception("lifecycle usage observer failed")

    async def _release_lease(self) -> None:
        async with self._cond:
            self.in_flight -= 1
            self.last_used_at = self.clock()
            self._usage_changed()
            self._cond.notify_all()
            after_use = (
                self.in_flight == 0
                and self.residents == 0
                and self._waiters == 0
                and self._pending is None
                and self.policy.offloads_after_use
                and not self.policy.pinned
            )
        if after_use:
            self._after_use_task = asyncio.get_running_loop().create_task(self.offload("offload after use"))

    # --- commands --------------------------------------------------------------------------

    async def load(self, reason: str = "preheat") -> str:
        """Bring the model onto its device without serving a request (preheat)."""
        async with self.use(record=False):
            pass
        return f"{self.state.value}"

    async def offload(self, reason: str = "requested") -> str:
        """Move weights to host memory once no request uses them. Returns what happened."""
        async with self._cond:
            while self._busy is not None:
                await self._cond.wait()
            if refusal := self._resident_refusal():
                return refusal
            if self.state is not S.GPU:
                return f"skipped: state is {self.state.value}"
            if self._pending is not None:
                return f"skipped: {self._pending} already queued"
            if self._waiters:
                return "cancelled: a request is waiting for the model"
            if self.in_flight:
                self._pending = "offload"
                while self.in_flight or self._busy is not None:
                    await self._cond.wait()
                    if self._pending != "offload":
                        return "cancelled: a request arrived while the offload was queued"
                self._pending = None
                if self.state is not S.GPU:
                    return f"skipped: state is {self.state.value}"
            self._busy = "offload"
        try:
            await self._run_offload(reason)
        finally:
            async with self._cond:
                self._busy = None
                self._cond.notify_all()
        if self.state is not S.CPU:  # `_run_offload` kept the model on the GPU
            return f"failed: {self.last_error}"
        return f"offloaded: {self.state.value}"

    async def release(self, reason: str = "requested") -> str:
        """Drop the weights once no request uses them; waiting requests then reload."""
        async with self._cond:
            while self._busy is not None or self._pending == "release":
                await self._cond.wait()
            if refusal := self._resident_refusal():
                return refusal
            if self.state not in (S.GPU, S.CPU):
                return f"skipped: state is {self.state.value}"
            if self._pending == "offload":
                self._pending = None  # release supersedes a queued offload
                self._cond.notify_all()
            self._pending = "release"
            try:
                while self.in_flight or self._busy is not None:
                    await self._cond.wait()
            finally:
                self._pending = None
            if self.state not in (S.GPU, S.CPU):
                self._cond.notify_all()
                return f"skipped: state is {self.state.value}"
            self._busy = "release"
        try:
            await self._run_release(reason)
        finally:
            async with self._cond:
                self._busy = None
                self._cond.notify_all()
        return "released"

    async def enforce_idle(self, now: float | None = None) -> str | None:
        """Apply this instance's own idle timeouts (used while the router is unreachable)."""
        now = self.clock() if now is None else now
        if self.in_flight or self.residents or self._busy or self.policy.pinned:
            return None
        idle = now - self.last_used_at
        if self.state is S.GPU and self.policy.idle_timeout_s is not None and idle >= self.policy.idle_timeout_s:
            return await self.offload(f"idle {idle:.1f}s >= idle_timeout_s {self.policy.idle_timeout_s}")
        idle_on_cpu = self.idle_in_state_s(now)
        if (
            self.state is S.CPU
            and self.policy.release_timeout_s is not None
            and idle_on_cpu >= self.policy.release_timeout_s
        ):
            return await self.release(
                f"idle on CPU {idle_on_cpu:.1f}s >= release_timeout_s {self.policy.release_timeout_s}"
            )
        return None

    # --- transitions -----------------------------------------------------------------------

    def _transition(self, new: ModelState, reason: str, *, duration_s: float | None = None) -> None:
        old = self.state
        if new not in ALLOWED[old]:
            raise IllegalTransition(old, new)
        self.state, self.reason, self.since = new, reason, self.clock()
        self.seq += 1
        event = TransitionEvent(self.model, old, new, reason, self.since, duration_s, self.last_error)
        logger.debug("model %s: %s -> %s (%s)", self.model, old.value, new.value, reason)
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:  # an observer must never break a transition
                logger.exception("lifecycle event observer failed")

    async def _bring_up(self, kind: str) -> None:
        if self.admit is not None:
            await self.admit(kind)
        if kind == "load":
            await self._run_load()
        else:
            await self._run_restore()

    async def _run_load(self) -> None:
        self._transition(S.LOADING, "first request" if self.timings.last_load_s is None else "reload")
        self.loads += 1
        logger.info("Loading model %r on %s (needs %s).", self.model, self.location or self.device, self._needs())
        start = time.perf_counter()
        try:
            await asyncio.to_thread(self.adapter.load, self.device)
        except BaseException as exc:
            await asyncio.to_thread(_safe_release, self.adapter)
            self.last_error = f"load failed: {type(exc).__name__}: {exc}"
            self.footprint = Footprint()
            self._transition(S.UNLOADED, "load failed")
            logger.error("Loading model %r failed: %s", self.model, exc)
            raise ModelLoadError(self.model, "load", exc) from exc
        elapsed = time.perf_counter() - start
        self.timings.last_load_s = elapsed
        self.moves["load"] += 1
        self.footprint = self.adapter.footprint()
        self.last_error = None
        self.last_used_at = self.clock()
        self._transition(S.GPU, "loaded", duration_s=elapsed)
        logger.info("Loaded model %r in %.1f ms.", self.model, elapsed * 1000)

    async def _run_restore(self) -> None:
        self._transition(S.RESTORING, "request arrived")
        logger.info(
            "Restoring model %r on %s (needs %s).", self.model, self.location or self.device,
            humanise_bytes(self.footprint.bytes_cpu) if self.footprint.bytes_cpu else self._needs(),
        )
        start = time.perf_counter()
        try:
            await asyncio.to_thread(self.adapter.to_gpu)
        except BaseException as exc:
            self.last_error = f"restore failed: {type(exc).__name__}: {exc}"
            try:
                await asyncio.to_thread(self.adapter.to_cpu)
                self.footprint = self.adapter.footprint()
                self._transition(S.CPU, "restore failed; CPU copy kept")
            except BaseException:
                await asyncio.to_thread(_safe_release, self.adapter)
                self.footprint = Footprint()
                self._transition(S.UNLOADED, "restore failed; weights dropped")
            logger.error("Restoring model %r failed: %s", self.model, exc)
            raise ModelLoadError(self.model, "restore", exc) from exc
        elapsed = time.perf_counter() - start
        self.timings.last_restore_s = elapsed
        self.moves["restore"] += 1
        self.footprint = self.adapter.footprint()
        self.last_error = None
        self.last_used_at = self.clock()
        self._transition(S.GPU, "restored", duration_s=elapsed)
        logger.info("Restored model %r in %.1f ms.", self.model, elapsed * 1000)

    async def _run_offload(self, reason: str) -> None:
        self._transition(S.OFFLOADING, reason)
        logger.info("Offloading model %r to CPU (%s).", self.model, reason)
        start = time.perf_counter()
        try:
            await asyncio.to_thread(self.adapter.to_cpu)
        except BaseException as exc:
            self.last_error = f"offload failed: {type(exc).__name__}: {exc}"
            self._transition(S.GPU, "offload failed")
            logger.error("Offloading model %r failed: %s", self.model, exc)
            return
        elapsed = time.perf_counter() - start
        self.timings.last_offload_s = elapsed
        self.moves["offload"] += 1
        self.footprint = self.adapter.footprint()
        self._transition(S.CPU, reason, duration_s=elapsed)
        logger.info("Offloaded model %r to CPU in %.1f ms (%s).", self.model, elapsed * 1000, reason)

    async def _run_release(self, reason: str) -> None:
        self._transition(S.RELEASING, reason)
        logger.info("Releasing model %r (%s).", self.model, reason)
        start = time.perf_counter()
        await asyncio.to_thread(_safe_release, self.adapter)
        elapsed = time.perf_counter() - start
        self.timings.last_release_s = elapsed
        self.moves["release"] += 1
        self.footprint = Footprint()
        self._transition(S.UNLOADED, reason, duration_s=elapsed)
        logger.info("Released model %r in %.1f ms (%s).", self.model, elapsed * 1000, reason)

    def _needs(self) -> str:
        try:
            need = self.need_bytes() if self.need_bytes is not None else None
        except Exception:
            need = None
        return humanise_bytes(need) if need else "size unknown until loaded"

    # --- reporting -------------------------------------------------------------------------

    def idle_in_state_s(self, now: float | None = None) -> float:
        """Idle time as the timeouts mean it: on the CPU tier, counted from arrival there."""
        idle = self.idle_s(now)
        if self.state is S.CPU:
            return min(idle, max(0.0, (self.clock() if now is None else now) - self.since))
        return idle

    def idle_s(self, now: float | None = None) -> float:
        if self.in_flight or self.residents:
            return 0.0
        return max(0.0, (self.clock() if now is None else now) - self.last_used_at)

    def status(self) -> dict[str, Any]:
        now = self.clock()
        return {
            "model": self.model,
            "state": self.state.value,
            "seq": self.seq,
            "reason": self.reason,
            "since_s": round(now - self.since, 3),
            "device": self.device,
            "bytes_gpu": self.footprint.bytes_gpu,
            "bytes_cpu": self.footprint.bytes_cpu,
            "in_flight": self.in_flight,
            "sessions": self.residents,
            "waiting": self._waiters,
            "idle_s": round(self.idle_s(now), 3),
            "idle_in_state_s": round(self.idle_in_state_s(now), 3),
            "last_used_at": self.last_used_at,
            "idle_timeout_s": self.policy.idle_timeout_s,
            "release_timeout_s": self.policy.release_timeout_s,
            "offload_after_use": self.policy.offload_after_use,
            "priority": self.policy.priority,
            "pinned": self.policy.pinned,
            "last_load_s": self.timings.last_load_s,
            "last_restore_s": self.timings.last_restore_s,
            "last_offload_s": self.timings.last_offload_s,
            "last_release_s": self.timings.last_release_s,
            "last_error": self.last_error,
            "loads": self.loads,
            "moves": dict(self.moves),
        }


def _safe_release(adapter: ModelAdapter) -> None:
    try:
        adapter.release()
    except Exception:
        logger.exception("releasing model weights failed; references dropped anyway")
