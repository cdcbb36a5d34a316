"""MCP tools for assistants: the admin API as `get_gpu_status`, `offload_gpu`, `release_gpu`,
`update_gpu_timeout`, `load_model` and `list_models` (the names the per-process managers this
service replaces used).

One tool set, two backends: mounted on the ingress at `/mcp` (streamable HTTP, stateless, so
any number of ingress replicas works) the tools call `operations` directly, the same functions
as `/gpu/*`; `python -m serve_app mcp --url URL` serves the same tools over stdio for desktop
clients and forwards each call to a running service's `/gpu/*` API. Facts that shaped this:
`streamable_http_app()` does not pickle, so the ingress builds it inside its app builder; a
mounted app's lifespan never runs, so the ingress lifespan enters `session_manager.run()`;
the SDK accepts only the Host headers it is given (421 otherwise), taken from
`http.mcp_allowed_hosts`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Annotated, Any, Protocol

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import BaseModel, ConfigDict, Field

from serve_app.errors import ServeError

INSTRUCTIONS = (
    "Manage the GPU memory of a gpu-serve cluster: read status, offload idle models to host RAM, release them, "
    "load (preheat) one, and change idle timeouts. Model ids come from list_models."
)
ADMIN_KEY_ENV = "GPU_SERVE_ADMIN_KEY"

ModelArg = Annotated[str | None, Field(description="A configured model id (see list_models); absent: every model.")]


class Backend(Protocol):
    """Where the tools' calls go: the ingress's own operations, or a service over HTTP."""

    async def status(self) -> dict[str, Any]: ...
    async def command(self, kind: str, model: str | None, **params: Any) -> dict[str, Any]: ...
    async def models(self) -> list[dict[str, Any]]: ...


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class GpuRow(_Open):
    uuid: str
    node: str | None = None
    total_bytes: int
    used_bytes: int
    free_bytes: int
    margin_bytes: int


class ModelRow(_Open):
    model: str
    replica: str | None
    state: str
    reason: str | None = None
    bytes_gpu: int | None = 0
    bytes_cpu: int | None = 0
    in_flight: int | None = 0
    idle_timeout_s: float | None = None
    release_timeout_s: float | None = None


class GpuStatus(_Open):
    """The `/gpu/status` document."""

    gpus: list[GpuRow]
    models: list[ModelRow]
    queue: list[dict[str, Any]]


class InstanceResult(_Open):
    model: str | None
    replica: str | None
    outcome: str
    state: str | None


class CommandResult(_Open):
    action: str
    model: str | None
    instances: list[InstanceResult] = Field(description="One entry per replica the command reached.")


class ModelInfo(_Open):
    id: str
    family: str
    priority: int
    pinned: bool
    idle_timeout_s: float | None
    release_timeout_s: float | None


class ModelList(BaseModel):
    models: list[ModelInfo]


def _without_root_logging(build: Callable[[], MCPServer]) -> MCPServer:
    """Build the server, leaving the process's root logger as it was.

    The SDK's constructor calls `logging.basicConfig(level="INFO")` with a rich handler: in the
    ingress that put every library's INFO records, the SDK's own "session manager started"
    among them, on stderr as multi-line rich boxes, and the service logs quietly, in its own format.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        return build()
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def build_server(backend: Backend) -> MCPServer:
    server = _without_root_logging(lambda: MCPServer("gpu-serve", instructions=INSTRUCTIONS))

    async def run(call: Any) -> Any:
        try:
            return await call
        except ServeError as exc:  # a bad model id or value: the message names it
            raise ToolError(exc.message) from None

    @server.tool(description="Every GPU (total, used, free, margin), every model instance (state, bytes, in flight, "
                 "idle time, timeouts, last load/restore times, last error) and the load queue.")
    async def get_gpu_status() -> GpuStatus:
        return GpuStatus.model_validate(await run(backend.status()))

    @server.tool(description="Offload a model's weights to host RAM (fast to restore); every model on a GPU when "
                 "model is absent. Waits for requests in flight.")
    async def offload_gpu(model: ModelArg = None) -> CommandResult:
        return CommandResult.model_validate(await run(backend.command("offload", model)))

    @server.tool(description="Release a model's weights (the next request reloads from disk); every idle model "
                 "when model is absent.")
    async def release_gpu(model: ModelArg = None) -> CommandResult:
        return CommandResult.model_validate(await run(backend.command("release", model)))

    @server.tool(description="Change timeouts at run time: idle_timeout_s (on GPU this long: offload; 0 = right "
                 "after use) and release_timeout_s (on CPU this long: release). timeout_seconds is the older "
                 "name of idle_timeout_s.")
    async def update_gpu_timeout(
        model: ModelArg = None,
        idle_timeout_s: Annotated[float | None, Field(ge=0, description="Seconds idle on GPU before offload.")] = None,
        release_timeout_s: Annotated[float | None, Field(gt=0, description="Seconds on CPU before release.")] = None,
        timeout_seconds: Annotated[float | None, Field(ge=0, description="Older name of idle_timeout_s.")] = None,
    ) -> CommandResult:
        if idle_timeout_s is None:
            idle_timeout_s = timeout_seconds
        elif timeout_seconds is not None and timeout_seconds != idle_timeout_s:
            raise ToolError(
                f"idle_timeout_s ({idle_timeout_s}) and timeout_seconds ({timeout_seconds}) disagree; give one"
            )
        params = {"idle_timeout_s": idle_timeout_s, "release_timeout_s": release_timeout_s}
        return CommandResult.model_validate(await run(backend.command("timeout", model, **params)))

    @server.tool(description="Load (preheat) a model onto its GPU now, starting a replica when it is scaled to zero.")
    async def load_model(model: Annotated[str, Field(description="A configured model id.")]) -> CommandResult:
        return CommandResult.model_validate(await run(backend.command("load", model)))

    @server.tool(description="Every configured model: family, priority, pinned, timeouts.")
    async def list_models() -> ModelList:
        return ModelList(models=[ModelInfo.model_validate(m) for m in await run(backend.models())])

    return server


class IngressBackend:
    """Inside the ingress: the shared operations, no HTTP hop."""

    async def status(self) -> dict[str, Any]:
        from serve_app.api import operations
        from serve_app.api.context import get_context

        return await operations.gpu_status(get_context())

    async def command(self, kind: str, model: str | None, **params: Any) -> dict[str, Any]:
        from serve_app.api import operations
        from serve_app.api.context import get_context

        ctx = get_context()
        if kind == "timeout":
            return await operations.set_timeouts(ctx, model, params.get("idle_timeout_s"),
                                                 params.get("release_timeout_s"))
        if kind == "load":
            return await operations.load(ctx, model)
        return await operations.command(ctx, kind, model)

    async def models(self) -> list[dict[str, Any]]:
        from serve_app.api import operations
        from serve_app.api.context import get_context

        return operations.list_models(get_context())


class HttpBackend:
    """For the stdio server: forward to a running service's `/gpu/*` with an admin key."""

    def __init__(self, url: str, key: str | None = None, timeout_s: float = 120.0) -> None:
        self.url = url.rstrip("/")
        self.key = key if key is not None else os.environ.get(ADMIN_KEY_ENV)
        self.timeout_s = timeout_s

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        import httpx2

        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        try:
            async with httpx2.AsyncClient(timeout=self.timeout_s) as client:
                r = await client.request(method, self.url + path, json=body, headers=headers)
        except httpx2.HTTPError as exc:
            raise ToolError(f"cannot reach gpu-serve at {self.url}: {type(exc).__name__}: {exc}") from None
        if r.status_code >= 400:
            try:
                message = r.json()["error"]["message"]
            except Exception:
                message = r.text[:500]
            raise ToolError(f"{r.status_code} from {path}: {message}")
        return r.json()

    async def status(self) -> dict[str, Any]:
        return await self._call("GET", "/gpu/status")

    async def command(self, kind: str, model: str | None, **params: Any) -> dict[str, Any]:
        body = {"model": model, **{k: v for k, v in params.items() if v is not None}}
        return await self._call("POST", f"/gpu/{kind}", {k: v for k, v in body.items() if v is not None})

    async def models(self) -> list[dict[str, Any]]:
        doc = await self._call("GET", "/gpu/status")
        rows: dict[str, dict[str, Any]] = {}
        for r in doc["models"]:
            rows.setdefault(r["model"], r)
        cards = {c["id"]: c for c in (await self._call("GET", "/v1/models"))["data"]}
        return [
            {"id": mid, "family": cards.get(mid, {}).get("family", "unknown"), "priority": r.get("priority") or 0,
             "pinned": bool(r.get("pinned")), "idle_timeout_s": r.get("idle_timeout_s"),
             "release_timeout_s": r.get("release_timeout_s")}
            for mid, r in rows.items()
        ]


def streamable_app(server: MCPServer, allowed_hosts: tuple[str, ...]) -> Any:
    """The Starlette app mounted at `/mcp`: stateless (any ingress replica can answer any call)."""
    from mcp.server.transport_security import TransportSecuritySettings

    security = TransportSecuritySettings(
        enable_dns_rebinding_protection="*" not in allowed_hosts,
        allowed_hosts=list(allowed_hosts),
        allowed_origins=[f"http://{h}" for h in allowed_hosts] + [f"https://{h}" for h in allowed_hosts],
    )
    return server.streamable_http_app(streamable_http_path="/", stateless_http=True, transport_security=security)
