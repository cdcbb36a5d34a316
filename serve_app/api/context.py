"""What the route handlers need: the config, the model handles, the router.

The ingress builds its FastAPI app from a builder function (the app object itself does not
pickle), so handlers cannot be methods of the ingress class; they reach the one `Context` of
their process through the `get_context` dependency instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from serve_app.config import AppConfig, ModelConfig
from serve_app.errors import InvalidRequest, ModelNotFound, ModelUnschedulable


@dataclass
class Context:
    config: AppConfig
    handles: dict[str, Any]
    router: Any = None
    #: {model id: why no live node can host a replica}; refreshed by the ingress every few seconds.
    unschedulable: dict[str, str] = field(default_factory=dict)
    #: The proxy mode and the model handles' transport, as the ingress found them at start.
    request_path: dict[str, Any] = field(default_factory=dict)
    #: Set in a model's own application (`serve_app/routed.py`): the one model its routes serve.
    only_model: str | None = None

    def model(self, model_id: str | None, family: str | None = None) -> ModelConfig:
        """The config of a served model; with `family` (a request to run it) also one Ray can place,
        so a request for a model no node can host answers 503 at once instead of hanging."""
        if not model_id:
            raise InvalidRequest("you must provide a model parameter", param="model", code="missing_model")
        if self.only_model is not None and model_id != self.only_model:
            raise InvalidRequest(
                f"this route serves model {self.only_model!r}, not {model_id!r}; send model "
                f"{self.only_model!r}, or use /v1 for any model",
                param="model", code="model_not_supported",
            )
        m = self.config.model(model_id)
        if m is None:
            raise ModelNotFound(model_id, [x.id for x in self.config.models])
        if family is not None and m.family != family:
            served = [x.id for x in self.config.models if x.family == family]
            raise InvalidRequest(
                f"model {model_id!r} is a {m.family} model and cannot serve this endpoint; "
                f"models that can: {', '.join(served) or '(none configured)'}",
                param="model",
                code="model_not_supported",
            )
        if family is not None:
            self.require_schedulable(m.id)
        return m

    def require_schedulable(self, model_id: str) -> None:
        reason = self.unschedulable.get(model_id)
        if reason is not None:
            raise ModelUnschedulable(model_id, reason)


_context: Context | None = None


def set_context(ctx: Context | None) -> None:
    global _context
    _context = ctx


def current_context() -> Context | None:
    """The context if the ingress set it yet (app builders run after it in Serve, before it in some tests)."""
    return _context


def get_context() -> Context:
    if _context is None:
        raise RuntimeError("the ingress context is not set; the ingress deployment sets it at start")
    return _context


async def request_context() -> Context:
    """`get_context` as a route dependency. FastAPI runs a plain `def` dependency in its thread
    pool: every request paid a hop to a worker thread and back (4-5% of the ingress event loop's
    samples under 8 embeddings clients, py-spy); an `async def` one runs on the loop."""
    return get_context()
