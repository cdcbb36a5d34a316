"""Routes of users' own deployments (`family: python`): `/v1/custom/{model_id}/{path}`.

The ingress cannot import a user's FastAPI router (its handlers live in the deployment's
process, next to the model), so it forwards: one generic route reads the request (method,
path below the model id, query, headers, body), checks it against this service's limits, and
calls the deployment's `handle_http` through its Serve handle, which runs the class's `routes`
in-process and returns status, headers and the buffered body. Errors on either side come back
in the service's OpenAI shape. Model ids may contain '/', so the id is matched as the longest
configured python model id that prefixes the path.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response

from serve_app.api.context import Context, request_context
from serve_app.api.errors import unwrap
from serve_app.config import PYTHON_FAMILY
from serve_app.errors import ModelNotFound, PayloadTooLarge

router = APIRouter()

#: Not forwarded: connection-level headers, and credentials meant for this service.
_DROPPED = frozenset({"host", "connection", "content-length", "transfer-encoding", "authorization", "cookie"})
_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]


def split_custom_path(ctx: Context, rest: str) -> tuple[str, str]:
    """'{model_id}/{path}' -> (model id, path), by the longest python model id that matches."""
    ids = sorted((m.id for m in ctx.config.models if m.family == PYTHON_FAMILY), key=len, reverse=True)
    for model_id in ids:
        if rest == model_id or rest.startswith(model_id + "/"):
            return model_id, rest[len(model_id) :]
    first = rest.split("/", 1)[0]
    raise ModelNotFound(first, ids)


#: The body is whatever the user's own route declares; the schema says so rather than nothing.
_ANY_BODY = {
    "requestBody": {
        "required": False,
        "description": "Forwarded as is to the model's own route under /v1/custom/{model_id}/.",
        "content": {"application/json": {"schema": {}}, "application/octet-stream": {"schema": {}}},
    }
}


async def custom(rest: str, request: Request, ctx: Context = Depends(request_context)) -> Response:
    model_id, path = split_custom_path(ctx, rest)
    body = await request.body()
    limit = ctx.config.http.max_upload_bytes
    if len(body) > limit:
        raise PayloadTooLarge(f"request body is {len(body)} bytes, over the limit of {limit} (http.max_upload_bytes)")
    forwarded: dict[str, Any] = {
        "method": request.method,
        "path": path or "/",
        "query": request.url.query,
        "headers": [(k, v) for k, v in request.headers.items() if k.lower() not in _DROPPED],
        "body": body,
    }
    try:
        out = await ctx.handles[model_id].handle_http.remote(forwarded)
    except Exception as exc:
        raise unwrap(exc) from None
    headers = {k: v for k, v in out["headers"] if k.lower() not in ("content-length", "transfer-encoding")}
    return Response(content=out["body"], status_code=out["status"], headers=headers)


# One route per method, each with its own operation id: one multi-method route gives every
# method the same id, which FastAPI warns about and OpenAPI clients reject.
for _method in _METHODS:
    router.add_api_route(
        "/v1/custom/{rest:path}", custom, methods=[_method], operation_id=f"custom_{_method.lower()}",
        openapi_extra=_ANY_BODY,
    )
