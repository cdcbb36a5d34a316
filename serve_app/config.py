"""Configuration, declared once and validated at deploy time.

The application's args in `serve_config.yaml` are parsed into :class:`AppConfig`. Every error
names the field and the offending value, because a bad config should fail the deploy with a
message a user can act on, not a replica crash loop minutes later.
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

logger = logging.getLogger("serve_app.config")

Family = Literal["sentence-transformers", "faster-whisper", "transformers-causal-lm", "python"]
FAMILIES: tuple[str, ...] = ("sentence-transformers", "faster-whisper", "transformers-causal-lm", "python")
#: The family of a user's own deployment (a `serve_app.ManagedModel` subclass named by `deployment`).
PYTHON_FAMILY = "python"
#: Families whose weights load through the torch adapter (serve_app/adapters/torch_module.py).
TORCH_FAMILIES: tuple[str, ...] = ("sentence-transformers", "transformers-causal-lm")

PositiveSeconds = Annotated[float, Field(ge=0)]
GiB = 1024**3
MiB = 1024**2


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class AutoscalingConfig(_Frozen):
    """Serve autoscaling for one model deployment.

    Defaults are tuned for scale-to-zero: Serve only scales up from zero replicas on its
    metrics cycle, about 10 s with Ray's defaults on our test machine; reporting every 0.5 s
    with a 2 s look-back brought the first request from zero to about 1.6 s.
    """

    min_replicas: int = Field(0, ge=0, description="0 allows scale-to-zero.")
    max_replicas: int = Field(2, ge=1, description="Upper bound on replicas of this model.")
    target_ongoing_requests: float | None = Field(
        None, gt=0,
        description="Requests per replica before scaling up; default 2, or a full batch for a batching family.",
    )
    metrics_interval_s: float = Field(0.5, gt=0, description="How often handles report queue lengths.")
    look_back_period_s: float = Field(2.0, gt=0, description="Window the autoscaler averages over.")
    upscale_delay_s: float = Field(0.0, ge=0, description="Wait before acting on an upscale decision.")
    downscale_delay_s: float = Field(
        600.0, ge=0, description="Idle time before a replica is scaled away (the last tier of freeing memory)."
    )

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must not exceed max_replicas ({self.max_replicas})"
            )
        return self

    def to_serve(self, default_target: float = 2.0) -> dict[str, Any]:
        return {
            "min_replicas": self.min_replicas,
            "initial_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests or default_target,
            "metrics_interval_s": self.metrics_interval_s,
            "look_back_period_s": self.look_back_period_s,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
        }


class ModelConfig(_Frozen):
    """One served model: one Serve deployment."""

    id: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$", description="Public model id.")
    family: str = Field(..., description=f"Model family, one of {', '.join(FAMILIES)}.")
    source: str = Field(
        "",
        description=(
            "Where the weights are: 'package:NAME' (a Python package exposing get_model_path()), "
            "a local directory, or 'hub:ORG/NAME' (downloaded by the model library on first load). "
            "Required for the built-in families; optional for family python (the class reads it)."
        ),
    )
    deployment: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_.]*$",
        description="family python: 'package.module:ClassName' of a serve_app.ManagedModel subclass.",
    )
    alternate: bool = Field(
        False,
        description=(
            "family python pipelines: use_models() holds one model at a time and offloads each right "
            "after its step (for GPUs that cannot hold the pipeline's models together)."
        ),
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="family python: free-form options the class reads (config.options)."
    )
    num_gpus: float = Field(
        0.25,
        description="Fraction of a GPU each replica reserves in Ray, in (0, 1]; 0 allowed for family python.",
    )
    num_cpus: float = Field(0.25, ge=0, description="Logical CPUs each replica reserves in Ray.")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources each replica needs (to pin a model to labelled nodes)."
    )
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig)
    max_ongoing_requests: int = Field(16, ge=1, description="Requests Serve sends one replica at once.")
    max_queued_requests: int = Field(
        256, ge=1, description="Requests Serve holds for this model when every replica is busy; beyond: 503."
    )
    # Lifecycle policy knobs.
    # Default null: a model leaves the GPU (or its CPU copy is released) only when a load needs the
    # room, chosen by expected reload cost. Measured with bench/policy_sim.py (two 24 GiB GPUs, 64 GiB
    # host, seed1/2/3): the old defaults 300 s / 1800 s made 263/353/189 GPU misses and 26/46/32 cold
    # loads; null/null 219/314/81 and 12/27/12; 300 s / null 261/353/184 and 17/34/12.
    idle_timeout_s: float | None = Field(
        None, ge=0, description="Idle on GPU this long: offload to CPU. 0: right after use; null: only for room."
    )
    release_timeout_s: float | None = Field(
        None, ge=0, description="Idle on CPU this long: release the weights. null: only when host RAM needs room."
    )
    offload_after_use: bool = Field(False, description="Offload as soon as the last in-flight request ends.")
    priority: int = Field(0, description="Higher wins: never evicted for a lower-priority load.")
    pinned: bool = Field(False, description="Never evicted, offloaded or released by the policy.")
    vram_bytes: int | None = Field(
        None, gt=0, description="Declared GPU footprint, used until the first load measures it."
    )
    # Family options.
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="'auto' uses CUDA when the replica has it.")
    compute_type: str | None = Field(
        None, description="CTranslate2 compute type; default int8 on CPU, float16 on CUDA (faster-whisper)."
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="torch dtype; 'auto' is float16 on CUDA and float32 on CPU (transformers)."
    )
    cpu_threads: int | None = Field(
        None, ge=1,
        description="Threads for inference on the CPU; default every core this replica may run on (embeddings: "
        "one less, at least one, left to the request path). Ray would otherwise give a replica with num_cpus "
        "below 2 one thread (OMP_NUM_THREADS=1).",
    )
    max_batch_size: int = Field(32, ge=1, description="Dynamic batching: most inputs in one forward pass.")
    # 0: a batch takes what is queued when the previous forward pass ends (continuous batching),
    # so a lone request never waits and concurrent ones still merge. A 10 ms wait cost one
    # embeddings client 6-8 ms at p50 (59 against 51-53 ms, 2 cores, HAProxy).
    batch_wait_timeout_s: float = Field(
        0.0, ge=0, description="Dynamic batching: wait this long for more requests to fill a batch."
    )
    # 10 ms on MiniLM, 8 clients, 3 interleaved rounds: mean batch 3.98 -> 6.17, requests/s
    # 74.3 -> 85.3 (higher in each round), 1-client p50 unchanged (26.9 / 25.8 ms); 5 ms: 4.20, 76.2.
    batch_regather_s: float = Field(
        0.01, ge=0,
        description="Continuous batching: while fewer requests are queued than the last batch and its queue "
        "held, wait up to this long for the callers just answered to come back (a lone request never waits).",
    )
    max_inputs: int = Field(2048, ge=1, description="Most inputs accepted in one embeddings request.")
    max_queue: int = Field(16, ge=0, description="Requests waiting for a busy instance before 503 (speech).")
    max_new_tokens: int = Field(512, ge=1, description="Cap on generated tokens per request (text).")
    fault_oom_at_bytes: int | None = Field(
        None, ge=1,
        description="Fault injection, for tests: a load raises a simulated out-of-memory once it has allocated "
        "this many bytes (torch families). Off (null) by default.",
    )

    @field_validator("family")
    @classmethod
    def _known_family(cls, v: str) -> str:
        if v not in FAMILIES:
            raise ValueError(f"unknown family {v!r}; expected one of: {', '.join(FAMILIES)}")
        return v

    @field_validator("num_gpus")
    @classmethod
    def _gpu_fraction(cls, v: float, info: ValidationInfo) -> float:
        # A python pipeline that holds no model of its own needs no GPU share (num_gpus: 0).
        if v == 0 and info.data.get("family") == PYTHON_FAMILY:
            return v
        if not 0 < v <= 1:
            raise ValueError(f"num_gpus must be in (0, 1], got {v!r}")
        return v

    @field_validator("fault_oom_at_bytes")
    @classmethod
    def _torch_fault(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and info.data.get("family") not in TORCH_FAMILIES:
            raise ValueError(
                f"fault_oom_at_bytes is honoured by the torch families ({', '.join(TORCH_FAMILIES)}) only, "
                f"not {info.data.get('family')!r}"
            )
        return v

    @field_validator("source")
    @classmethod
    def _source_exists(cls, v: str, info: ValidationInfo) -> str:
        if not v:
            if info.data.get("family") not in (None, PYTHON_FAMILY):
                raise ValueError(f"source is required for family {info.data.get('family')!r}")
            return v
        kind, _ = split_source(v)
        if kind == "path":
            path = Path(v).expanduser()
            if not path.exists():
                raise ValueError(f"source path {v!r} does not exist")
        elif kind == "package":
            name = v.split(":", 1)[1]
            if not name.isidentifier():
                raise ValueError(f"source package {name!r} is not a valid module name")
        return v

    @model_validator(mode="after")
    def _python_deployment(self) -> ModelConfig:
        if self.family != PYTHON_FAMILY and not self.source:
            raise ValueError(f"source is required for family {self.family!r} (model {self.id!r})")
        if self.family == PYTHON_FAMILY and self.deployment is None:
            raise ValueError(
                "family python needs deployment: 'package.module:ClassName' (a serve_app.ManagedModel subclass)"
            )
        if self.family != PYTHON_FAMILY and (self.deployment is not None or self.alternate or self.options):
            raise ValueError(
                f"deployment, alternate and options are for family python; model {self.id!r} is {self.family}"
            )
        return self

    def resolve_source(self) -> str:
        """Return what the model library should open: a local path or a hub id."""
        return resolve_source(self.source)


def split_source(source: str) -> tuple[str, str]:
    if source.startswith("package:"):
        return "package", source.split(":", 1)[1]
    if source.startswith("hub:"):
        return "hub", source.split(":", 1)[1]
    return "path", source


def resolve_source(source: str) -> str:
    kind, value = split_source(source)
    if kind == "package":
        try:
            module = importlib.import_module(value)
        except ImportError as exc:
            raise ValueError(
                f"source package {value!r} is not installed; install it (pip install "
                f"{value.replace('_', '-')}) or point source at a local directory"
            ) from exc
        return str(module.get_model_path())
    if kind == "hub":
        return value
    return str(Path(value).expanduser().resolve())


class RouterConfig(_Frozen):
    """The cluster router: memory accounting and placement."""

    tick_s: float = Field(1.0, gt=0, description="How often the router re-plans without an event.")
    probe_interval_s: float = Field(1.0, gt=0, description="How often each node's probe reads its GPUs.")
    heartbeat_s: float = Field(1.0, gt=0, description="How often replicas report to the router.")
    replica_timeout_s: float = Field(10.0, gt=0, description="No heartbeat this long: the replica is gone.")
    margin_fraction: float = Field(0.05, ge=0, lt=1, description="Safety margin, as a fraction of a GPU.")
    margin_bytes: int = Field(512 * MiB, ge=0, description="Safety margin in bytes; the larger margin wins.")
    # Default 1.0: a measured footprint is what the same load takes again (the margin covers growth);
    # guesses keep their factor (weights_factor). bench/policy_sim.py, one 48 GiB GPU, seed1/2/3: 1.2
    # made 244/306/83 cold loads, 1.0 made 220/261/85, 0 over-commits both. Raise it for models that
    # grow after loading.
    headroom_factor: float = Field(1.0, ge=1, description="Measured footprint times this is a model's need.")
    weights_factor: float = Field(1.3, ge=1, description="Weight files' size times this, before any load.")
    max_loads_per_gpu: int = Field(1, ge=1, description="Concurrent loads on one GPU.")
    max_models_per_gpu: int | None = Field(None, ge=1, description="Cap on resident models per GPU.")
    aging_s: float = Field(30.0, gt=0, description="Waiting this long raises a load's priority by one.")
    host_ram_budget_bytes: int | None = Field(
        None,
        ge=0,
        description=(
            "Host RAM for the CPU tier per node; null: half of what the node may use (its RAM, capped by "
            "its container's memory limit). On KubeRay the GPU worker's memory limit is sized for this."
        ),
    )
    request_timeout_s: float = Field(60.0, gt=0, description="A load waiting longer than this answers 503.")
    trace_capacity: int = Field(
        20000, ge=0, description="Request arrivals (and, apart, weight moves) the trace ring keeps; 0: no trace."
    )
    audit_window_s: float = Field(3600.0, gt=0, description="Sliding window of the policy self-audit.")
    rate_tau_s: float = Field(30.0, gt=0, description="Time constant of each model's decayed request rate.")
    timeout_max_cost_s: float | None = Field(
        None, gt=0,
        description=(
            "Opt-in: an expired idle_timeout_s waits while the model's expected reload seconds exceed this, and "
            "release_timeout_s acts only when the node's host budget is short; null: timeouts act as configured."
        ),
    )
    cost_horizon_s: float = Field(
        10.0, gt=0, description="How far ahead an eviction's expected reload seconds are counted."
    )
    simulated_gpu_bytes: int = Field(16 * GiB, gt=0, description="Total of each simulated GPU (no NVML).")
    simulated_external_bytes: dict[str, int] = Field(
        default_factory=dict, description="Simulated use by other processes, per GPU id."
    )


class HttpConfig(_Frozen):
    max_upload_bytes: int = Field(
        25 * MiB, gt=0,
        description="Largest upload (OpenAI's limit is 25 MB); any larger request body gets 413 before it is read.",
    )
    api_keys: tuple[str, ...] = Field(
        (), repr=False,
        description="Inference keys for /v1/* (plus GPU_SERVE_API_KEYS); none: inference is open.",
    )
    admin_keys: tuple[str, ...] = Field(
        (), repr=False,
        description="Admin keys for /gpu/* commands, /gpu/events and /mcp (plus GPU_SERVE_ADMIN_KEYS); "
        "none: admin commands only from loopback.",
    )
    num_cpus: float = Field(0.1, ge=0, description="Logical CPUs for the ingress replica.")
    check_placement: bool = Field(
        True,
        description="Answer 503 at once for a model no live node can host (e.g. GPUs asked, none in the "
        "cluster) instead of waiting for a replica. Turn off where the Ray autoscaler adds such nodes from zero.",
    )
    num_replicas: int = Field(1, ge=1, description="Ingress replicas.")
    model_routes: bool = Field(
        True,
        description="Give each embeddings and speech model its own Serve application at /models/{id}/v1, "
        "answered by the model's replica itself (one hop, no ingress between); /v1 keeps serving them "
        "(HAProxy sends /v1/embeddings for them to the replica too). Needs the applications deployed together: "
        "`python -m serve_app run`, or the config `python -m serve_app config` prints for `serve run`/KubeRay.",
    )
    mcp_allowed_hosts: tuple[str, ...] = Field(
        ("127.0.0.1:*", "localhost:*", "[::1]:*"),
        description="Host headers /mcp accepts (DNS-rebinding protection; 'name:*' is any port, '*' turns the "
        "check off). Add the names clients use in a cluster, e.g. 'gpu-serve-serve-svc:*'.",
    )


    @field_validator("api_keys", "admin_keys", mode="before")
    @classmethod
    def _comma_separated(cls, v: Any) -> Any:
        """A string is a comma-separated list, as in the GPU_SERVE_*_KEYS variables."""
        if isinstance(v, str):
            return tuple(k.strip() for k in v.split(",") if k.strip())
        return v


class RealtimeConfig(_Frozen):
    """Realtime transcription sessions (`/v1/realtime`, `/asr`): limits that keep a session from
    holding a replica or the ingress's memory without bound."""

    max_sessions_per_replica: int = Field(
        8, ge=1, description="Open sessions one speech replica holds; one more is refused (error, then close 1013)."
    )
    session_idle_timeout_s: float = Field(
        30.0, gt=0, description="No audio for this long: the session is closed with a reason."
    )
    max_buffered_audio_s: float = Field(
        120.0, gt=0, description="Audio a session may hold untranscribed (turns waiting for the model); more: error."
    )
    max_turn_s: float = Field(
        28.0, gt=0, le=30, description="A turn this long is committed by the server (Whisper sees 30 s windows)."
    )
    partial_interval_s: float = Field(
        0.6, ge=0.5, le=1.0, description="Re-transcribe a growing turn at most this often, for partial text."
    )


class AppConfig(_Frozen):
    """Everything in the application's `args`."""

    models: list[ModelConfig] = Field(..., min_length=1)
    router: RouterConfig = Field(default_factory=RouterConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    realtime: RealtimeConfig = Field(default_factory=RealtimeConfig)
    namespace: str = Field("gpu-serve", description="Ray namespace of the router and probe actors.")

    @model_validator(mode="after")
    def _unique_ids(self) -> AppConfig:
        seen: set[str] = set()
        for m in self.models:
            if m.id in seen:
                raise ValueError(f"model id {m.id!r} is listed twice in models")
            seen.add(m.id)
        return self

    def model(self, model_id: str) -> ModelConfig | None:
        return next((m for m in self.models if m.id == model_id), None)


class ConfigError(ValueError):
    """The application's args are invalid; the message names each field and value."""


def parse_app_config(args: dict[str, Any]) -> AppConfig:
    try:
        return AppConfig.model_validate(args)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = _format_loc(err["loc"], args)
            value = "(hidden)" if {"api_keys", "admin_keys"} & {str(p) for p in err["loc"]} else err.get("input")
            lines.append(f"  {loc}: {err['msg']} (got {value!r})")
        raise ConfigError("invalid gpu-serve config:\n" + "\n".join(lines)) from None


def _format_loc(loc: tuple[Any, ...], args: dict[str, Any]) -> str:
    parts: list[str] = []
    node: Any = args
    for item in loc:
        if isinstance(item, int):
            label = f"[{item}]"
            if isinstance(node, list) and item < len(node) and isinstance(node[item], dict) and "id" in node[item]:
                label = f"[{item}](id={node[item]['id']!r})"
            parts.append(label)
        else:
            parts.append(("." if parts else "") + str(item))
        try:
            node = node[item]
        except (KeyError, IndexError, TypeError):
            node = None
    return "".join(parts) or "args"  # a whole-config check (duplicate ids) has an empty location


class Settings(BaseSettings):
    """Process-level settings from the environment (prefix GPU_SERVE_)."""

    model_config = SettingsConfigDict(env_prefix="GPU_SERVE_", extra="ignore")

    log_level: str = Field("WARNING", description="Log level of the service's own loggers.")
    log_json: bool = Field(True, description="Structured (JSON) log lines.")
    access_log: bool = Field(False, description="One log line per HTTP request (Serve's access log).")
    proxy: Literal["haproxy", "serve"] = Field(
        "haproxy", description="HTTP proxy of a cluster `serve_app run` starts: HAProxy, or Serve's own."
    )


def log_effective(config: AppConfig) -> None:
    for m in config.models:
        logger.info(
            "model %s family=%s source=%s num_gpus=%s idle_timeout_s=%s release_timeout_s=%s",
            m.id, m.family, m.source, m.num_gpus, m.idle_timeout_s, m.release_timeout_s,
        )


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in {"1", "true", "yes"}
