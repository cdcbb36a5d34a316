"""Bring your own model: `ManagedModel`, the public base class of a user's own Serve deployment.

Three steps (the README's "Manage your own model" shows them whole):

1. subclass :class:`ManagedModel` (decorating it with `@serve.deployment` is optional);
2. implement ``load(device)``, returning the model: a ``torch.nn.Module``, an object holding
   modules, a CTranslate2 model, an object with ``offload/restore/release/footprint``
   (:class:`serve_app.adapters.managed.OffloadProtocol`), or None for no weights of its own;
3. wrap model work in ``async with self.use() as model:`` (async code) or
   ``await self.run(fn, *args)`` (blocking code, run in a thread as ``fn(model, *args)``).

It is the same shell as the built-in families (`serve_app.cluster.replica.ModelReplica`): the
model loads on the first request, registers with the cluster router, shows in `/gpu/status`,
and is offloaded, restored, evicted and released by the same policy, with the same leases.

**Several models at once.** ``async with self.use_models("codec", "lm") as (codec, lm):`` reaches
other deployments of this service by handle and holds all of them resident for the block: each
member asks the router with one group id and the policy admits the group as one
(`serve_app/core/groups.py`). ``await codec.encode(x)`` calls the member deployment's method
``encode`` (which takes its own lease as usual) while the group lease keeps it resident. With
``alternate: true`` in the pipeline's config, each call instead holds only its own model and
offloads it right after the step, for GPUs that cannot hold the models together.

Group leases are held on the replica that answered the enter call; a later call through the
handle reaches that replica when the member has one replica (`max_replicas: 1`), otherwise it
may reach another replica, which serves it under its own lease (loading if it must).

**HTTP.** A class may set ``routes`` to a FastAPI ``APIRouter``. The service's ingress forwards
``/v1/custom/{model_id}/{path}`` to the deployment's :meth:`ManagedModel.handle_http`, which
runs the router in-process; a route reaches its deployment with ``Depends(deployment)``. The
response body is buffered (no streaming through this path).

**Without this project's ingress**, bind the class into any Serve application:
``serve.deployment(MyModel).bind({"id": "mine", "family": "python", "deployment": "pkg.mod:MyModel"})``
(both arguments are optional; the second is this service's app config, for the router's knobs).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ClassVar, TypeVar

from starlette.requests import Request

from serve_app.adapters import ModelAdapter
from serve_app.adapters.managed import ResolvingAdapter
from serve_app.cluster.link import GROUP_GRANT
from serve_app.cluster.names import deployment_name
from serve_app.cluster.replica import ModelReplica
from serve_app.config import PYTHON_FAMILY
from serve_app.errors import InvalidRequest, ModelNotFound

logger = logging.getLogger("serve_app.managed")
T = TypeVar("T")

__all__ = ["ManagedModel", "ModelRef", "deployment"]


class ManagedModel(ModelReplica):
    """Base class of a user's deployment whose GPU memory this service manages. Lazy: nothing
    is loaded in `__init__`; `load(device)` runs on the first request."""

    #: Optional FastAPI APIRouter, mounted by the ingress under /v1/custom/{model_id}/.
    routes: ClassVar[Any] = None
    #: A group lease not given back by its pipeline (its replica died) ends after this long.
    group_lease_timeout_s: ClassVar[float] = 600.0

    def __init__(
        self,
        model: dict[str, Any] | None = None,
        app: dict[str, Any] | None = None,
        handles: dict[str, Any] | None = None,
    ) -> None:
        cls = type(self)
        model = {
            "id": cls.__name__, "family": PYTHON_FAMILY, "deployment": f"{cls.__module__}:{cls.__qualname__}",
            **(model or {}),
        }
        super().__init__(model, app or {"models": [model]})
        self.handles: dict[str, Any] = dict(handles or {})
        self._leases: dict[str, contextlib.AsyncExitStack] = {}
        self._http_app: Any = None

    # --- what a subclass implements ----------------------------------------------------------

    def load(self, device: str) -> Any:
        """Build or read the model onto `device` ("cuda:0" or "cpu") and return it. Blocking:
        it runs in a worker thread."""
        raise NotImplementedError(
            f"{type(self).__qualname__} must implement load(device) and return its model (or None)"
        )

    # --- using the model ---------------------------------------------------------------------

    def make_adapter(self) -> ModelAdapter:
        weights = self.config.resolve_source() if self.config.source else None
        return ResolvingAdapter(
            self.load, name=self.config.id, weights_path=weights, declared_bytes=self.config.vram_bytes
        )

    @property
    def model(self) -> Any:
        """The loaded model; only valid inside `use()` or `run()`."""
        return self.adapter.model  # type: ignore[attr-defined]

    @contextlib.asynccontextmanager
    async def use(self) -> AsyncIterator[Any]:
        """Hold the model on its device for the block (loading or restoring it first)."""
        async with self.lifecycle.use():
            yield self.model

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run blocking `fn(model, *args, **kwargs)` in a thread while holding the model."""
        return await super().run(lambda: fn(self.model, *args, **kwargs))

    # --- several models at once --------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def use_models(self, *model_ids: str) -> AsyncIterator[tuple[ModelRef, ...]]:
        """Hold the named models (deployments of this service) resident together for the block.

        Raises `serve_app.errors.CapacityError` (503) when they can never fit together, naming
        the numbers, or when no room came within the router's request timeout.
        """
        if not model_ids:
            raise InvalidRequest("use_models() needs at least one model id", param="model")
        alternate = self.config.alternate
        refs = tuple(ModelRef(m, self._member(m), alternate=alternate) for m in model_ids)
        if alternate:
            yield refs
            return
        group = uuid.uuid4().hex[:16]
        results = await asyncio.gather(*(r._enter(group, len(refs)) for r in refs), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            await self.link.cancel_group(group)
            await asyncio.gather(
                *(r._exit() for r, res in zip(refs, results, strict=True) if not isinstance(res, BaseException)),
                return_exceptions=True,
            )
            raise _unwrap(failed[0])
        try:
            yield refs
        finally:
            await asyncio.gather(*(r._exit() for r in refs), return_exceptions=True)

    def _member(self, model_id: str) -> Any:
        if model_id == self.config.id:
            return self
        if model_id in self.handles:
            return self.handles[model_id]
        from ray import serve

        from serve_app import routed

        app_name = serve.get_replica_context().app_name
        member = self.app_config.model(model_id)
        if member is not None and routed.has_route(self.app_config, member):
            app_name = routed.app_name(app_name, model_id)  # in an application of its own
        try:
            handle = serve.get_deployment_handle(deployment_name(model_id), app_name=app_name)
        except Exception as exc:
            raise ModelNotFound(model_id, [m.id for m in self.app_config.models]) from exc
        self.handles[model_id] = handle
        return handle

    # --- called through the Serve handle by a pipeline's use_models() --------------------------

    async def group_enter(self, group: str, size: int) -> str:
        """Join `group` at the router, then take a lease once the group is admitted as one.

        Returns a lease token for `group_exit`.
        """
        grant = await self.link.admit_group(group, size)
        stack = contextlib.AsyncExitStack()
        token = GROUP_GRANT.set(grant)
        try:
            await stack.enter_async_context(self.lifecycle.use())
        finally:
            GROUP_GRANT.reset(token)
            self.link.release_hold()
        lease = uuid.uuid4().hex
        self._leases[lease] = stack
        asyncio.get_running_loop().call_later(
            self.group_lease_timeout_s, lambda: asyncio.ensure_future(self.group_exit(lease))
        )
        return lease

    async def group_exit(self, lease: str) -> None:
        stack = self._leases.pop(lease, None)
        if stack is not None:
            await stack.aclose()

    async def managed_call(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], offload_after: bool
    ) -> Any:
        """Call this deployment's `method`; with `offload_after` (an `alternate` pipeline's step),
        offload the model right after, so the next step's model finds the room."""
        if method.startswith("_") or not callable(getattr(self, method, None)):
            raise InvalidRequest(f"model {self.config.id!r} has no method {method!r}", param="method")
        result = getattr(self, method)(*args, **kwargs)
        if inspect.isawaitable(result):
            result = await result
        if offload_after and self.lifecycle.in_flight == 0:
            # Only when nobody else holds the model: another request's lease would make the
            # offload wait for it, and this step's caller with it.
            outcome = await self.lifecycle.offload("alternate pipeline: step done")
            logger.debug("model %r after its pipeline step: %s", self.config.id, outcome)
        return result

    # --- HTTP (forwarded by the ingress) -----------------------------------------------------

    async def handle_http(self, request: dict[str, Any]) -> dict[str, Any]:
        """Serve one forwarded request with the class's `routes`, in-process (ASGI).

        `request`: method, path (below /v1/custom/{model_id}), query (raw), headers (pairs),
        body (bytes). Returns status, headers (pairs) and body (bytes).
        """
        app = self._fastapi()
        done = asyncio.Event()
        body: bytes = request.get("body") or b""
        delivered = False

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await done.wait()
            return {"type": "http.disconnect"}

        out: dict[str, Any] = {"status": 500, "headers": [], "body": b""}
        chunks: list[bytes] = []

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                out["status"] = message["status"]
                out["headers"] = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])]
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        path = "/" + str(request.get("path", "")).lstrip("/")
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": str(request.get("method", "GET")).upper(),
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": str(request.get("query", "")).encode(),
            "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in request.get("headers", [])],
            "client": ("127.0.0.1", 0),
            "server": ("127.0.0.1", 80),
        }
        try:
            await app(scope, receive, send)
        finally:
            done.set()
        out["body"] = b"".join(chunks)
        return out

    def _fastapi(self) -> Any:
        if self._http_app is None:
            from fastapi import FastAPI

            from serve_app.api.errors import install_error_handlers

            app = FastAPI(title=self.config.id)
            install_error_handlers(app)
            if self.routes is not None:
                app.include_router(self.routes)
            app.state.deployment = self
            self._http_app = app
        return self._http_app


def deployment(request: Request) -> Any:
    """FastAPI dependency for a `routes` handler: the ManagedModel serving the request.

    Use: ``async def speak(body: Body, me: MyModel = Depends(deployment))``.
    """
    return request.app.state.deployment


class ModelRef:
    """One model of a `use_models()` block: ``await ref.method(*args)`` calls that deployment's
    method (through its Serve handle, or directly for the pipeline's own model)."""

    def __init__(self, model_id: str, target: Any, *, alternate: bool) -> None:
        self.model_id = model_id
        self._target = target
        self._local = isinstance(target, ManagedModel)
        self._alternate = alternate
        self._lease: str | None = None

    def __repr__(self) -> str:
        return f"ModelRef({self.model_id!r}, alternate={self._alternate})"

    def __getattr__(self, method: str) -> Callable[..., Awaitable[Any]]:
        if method.startswith("_"):
            raise AttributeError(method)

        async def call(*args: Any, **kwargs: Any) -> Any:
            if self._local:
                return await self._target.managed_call(method, args, kwargs, self._alternate)
            try:
                return await self._target.managed_call.remote(method, args, kwargs, self._alternate)
            except Exception as exc:
                raise _unwrap(exc) from None

        return call

    async def _enter(self, group: str, size: int) -> None:
        if self._local:
            self._lease = await self._target.group_enter(group, size)
        else:
            self._lease = await self._target.group_enter.remote(group, size)

    async def _exit(self) -> None:
        lease, self._lease = self._lease, None
        if lease is None:
            return
        if self._local:
            await self._target.group_exit(lease)
        else:
            await self._target.group_exit.remote(lease)


def _unwrap(exc: BaseException) -> BaseException:
    from serve_app.api.errors import unwrap

    return unwrap(exc)
