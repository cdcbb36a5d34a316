"""The placement policy's inputs and outputs: plain frozen data, no Ray, no torch, no clock.

The router builds a :class:`Snapshot` from what replicas and probes report, hands it to
:func:`serve_app.core.policy.decide`, and carries out the returned actions. Keeping the data
plain is what lets the policy be tested with a fake clock and replayed deterministically.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from serve_app.core.states import ModelState


@dataclass(frozen=True, slots=True)
class GpuView:
    """One GPU as the probe on its node last read it."""

    uuid: str
    node: str
    index: int
    total_bytes: int
    #: What the memory probe reports as used / free (NVML, or the simulation).
    used_bytes: int
    free_bytes: int
    name: str = ""
    simulated: bool = False


@dataclass(frozen=True, slots=True)
class InstanceView:
    """One model instance (one lifecycle inside one replica)."""

    model: str
    replica: str
    node: str
    #: NVML UUID of the GPU the replica was given; None for a replica without a GPU.
    gpu: str | None
    state: ModelState
    #: Bytes this instance holds on its GPU. While `loading`/`restoring` this is the
    #: reservation granted at admission, so memory promised but not yet allocated is counted.
    bytes_gpu: int
    #: Bytes held in host RAM (the CPU tier).
    bytes_cpu: int
    #: Monotonic time of the last request end (or load end, whichever is later).
    last_used_at: float
    in_flight: int = 0
    priority: int = 0
    idle_timeout_s: float | None = None
    release_timeout_s: float | None = None
    offload_after_use: bool = False
    pinned: bool = False
    #: Per-model statistics the router measures (see `serve_app/core/cost.py`): the model's decayed
    #: request rate, and its last measured cold-load and restore seconds (None: not measured yet).
    request_rate_hz: float = 0.0
    load_s: float | None = None
    restore_s: float | None = None
    #: Predicted time of the model's next request, from its history of inter-arrival gaps
    #: (`serve_app/core/cost.py`, `GapHistory.next_use_at`); None: no history.
    next_use_at: float | None = None


@dataclass(frozen=True, slots=True)
class PendingLoad:
    """A replica asking to move a model onto a GPU (a first load or a restore from CPU)."""

    request_id: str
    model: str
    replica: str
    node: str
    #: GPU UUIDs this replica may use (the ones Ray assigned to it).
    gpus: tuple[str, ...]
    bytes_needed: int
    priority: int
    enqueued_at: float
    kind: str = "load"  # "load", "restore", or "resident" (a joint member already on its GPU)
    #: Joint admission (see `serve_app/core/groups.py`): requests sharing a group id are admitted
    #: together or not at all, once all `group_size` of them have arrived.
    group: str | None = None
    group_size: int = 1


@dataclass(frozen=True, slots=True)
class PolicyLimits:
    """Knobs of the placement policy (see `serve_app.config.RouterConfig` for their docs)."""

    margin_fraction: float = 0.05
    margin_bytes: int = 512 * 1024**2
    max_loads_per_gpu: int = 1
    max_models_per_gpu: int | None = None
    #: Seconds of waiting that raise a pending request's effective priority by one.
    aging_s: float = 30.0
    #: How far ahead an eviction's expected reload cost is counted (`serve_app/core/cost.py`).
    cost_horizon_s: float = 10.0
    #: Opt-in: expired idle timeouts move a model down a tier only when that is cheap (see
    #: `decide`): a GPU copy whose expected reload seconds exceed this stays; a CPU copy is released
    #: only when the node's host budget is short. None (default): timeouts act as configured.
    timeout_max_cost_s: float | None = None
    #: Price an offload (a restore to come) by `InstanceView.next_use_at` too, as a release is. Off:
    #: with the router's online estimate it made more GPU misses (`serve_app/core/cost.py`); the
    #: simulator's hindsight references (`bench/policy_sim.py --hindsight`), told the next use, set it.
    next_use_for_offloads: bool = False


@dataclass(frozen=True, slots=True)
class Snapshot:
    gpus: tuple[GpuView, ...]
    instances: tuple[InstanceView, ...]
    pending: tuple[PendingLoad, ...] = ()
    #: Host-RAM budget for the CPU tier, per node. A node absent here has no budget (0).
    host_budget_bytes: dict[str, int] = field(default_factory=dict)
    limits: PolicyLimits = field(default_factory=PolicyLimits)


# --- actions ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Admit:
    request_id: str
    model: str
    replica: str
    gpu: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Offload:
    model: str
    replica: str
    reason: str


@dataclass(frozen=True, slots=True)
class Release:
    model: str
    replica: str
    reason: str


@dataclass(frozen=True, slots=True)
class Wait:
    request_id: str
    model: str
    replica: str
    reason: str


@dataclass(frozen=True, slots=True)
class Reject:
    """The request can never be admitted as asked (a group that cannot fit together): answer now."""

    request_id: str
    model: str
    replica: str
    reason: str


Action = Admit | Offload | Release | Wait | Reject
