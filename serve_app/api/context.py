"""What the route handlers need: the config, the model handles, the router.

The ingress builds its FastAPI app from a builder function (the app object itself does not
pickle), so handlers cannot be methods of the ingress class; they reach the one `Context` of
their process through the `get_context` dependency instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from serve_app.config import AppConfig, ModelConfig
from serve_app.errors import InvalidRequest, ModelNotFound


@dataclass
class Context:
    config: AppConfig
    handles: dict[str, Any]
    router: Any = None

    def model(self, model_id: str | None, family: str | None = None) -> ModelConfig:
        if not model_id:
            raise InvalidRequest("you must provide a model parameter", param="model", code="missing_model")
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
        return m


_context: Context | None = None


def set_context(ctx: Context | None) -> None:
    global _context
    _context = ctx


def get_context() -> Context:
    if _context is None:
        raise RuntimeError("the ingress context is not set; the ingress deployment sets it at start")
    return _context
