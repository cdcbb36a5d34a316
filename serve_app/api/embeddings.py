"""POST /v1/embeddings, as OpenAI defines it."""

from __future__ import annotations

import base64
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serve_app.api.context import Context, get_context
from serve_app.api.errors import invalid_from_validation, json_body
from serve_app.errors import InvalidRequest

router = APIRouter()


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(..., min_length=1)
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, gt=0)
    user: str | None = None


def parse_request(body: Any) -> EmbeddingsRequest:
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object", code="invalid_json")
    raw_input = body.get("input")
    if (isinstance(raw_input, list) and raw_input and all(isinstance(x, int) for x in raw_input)) or (
        isinstance(raw_input, list) and raw_input and all(isinstance(x, list) for x in raw_input)
    ):
        raise InvalidRequest(
            "token-id input is not supported; send the text as a string or a list of strings", param="input"
        )
    try:
        return EmbeddingsRequest.model_validate(body)
    except ValidationError as exc:
        raise invalid_from_validation(exc) from None


@router.post("/v1/embeddings")
async def create_embeddings(request: Request, ctx: Context = Depends(get_context)) -> dict[str, Any]:
    req = parse_request(await json_body(request))
    model = ctx.model(req.model, family="sentence-transformers")
    texts = [req.input] if isinstance(req.input, str) else list(req.input)
    if not texts:
        raise InvalidRequest("input must not be empty", param="input")
    if len(texts) > model.max_inputs:
        raise InvalidRequest(
            f"input has {len(texts)} items, more than the limit of {model.max_inputs} for model {model.id!r}; "
            "split the request",
            param="input",
        )
    for i, text in enumerate(texts):
        if not text.strip():
            raise InvalidRequest(f"input[{i}] is empty; every input must contain text", param="input")
    result = await ctx.handles[model.id].embed.remote(texts)
    vectors: np.ndarray = result["embeddings"]
    if req.dimensions is not None:
        if req.dimensions > vectors.shape[1]:
            raise InvalidRequest(
                f"dimensions {req.dimensions} exceeds the model's {vectors.shape[1]}", param="dimensions"
            )
        vectors = vectors[:, : req.dimensions]
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    data = []
    for i, vec in enumerate(vectors):
        vec32 = np.ascontiguousarray(vec, dtype=np.float32)
        embedding: Any = (
            base64.b64encode(vec32.tobytes()).decode() if req.encoding_format == "base64" else vec32.tolist()
        )
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    tokens = int(result["tokens"])
    return {
        "object": "list",
        "data": data,
        "model": model.id,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
