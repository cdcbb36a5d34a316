"""POST /v1/chat/completions and POST /v1/completions, as OpenAI defines them.

Both go to the model's `TextGenerationDeployment`: `generate` for a whole answer, and
`generate_stream` (a Serve streaming handle) for server-sent events. A stream's first event
arrives once the model is on its device; when it comes within `progress.GRACE_S` (the model
was ready) a refusal still answers with a proper status code. Otherwise the stream starts with
progress comment lines (`: loading 'x' on GPU-0, 1.0 of ~3 s`) while the model loads or waits
for room; after the headers are sent, an error can only travel as an `error` event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from serve_app.api import progress
from serve_app.api.context import Context, request_context
from serve_app.api.errors import unwrap
from serve_app.errors import InvalidRequest, ServeError, error_body

logger = logging.getLogger("serve_app.api.chat")
router = APIRouter()

FAMILY = "transformers-causal-lm"
ROLES = ("system", "developer", "user", "assistant")
MAX_STOP = 4  # OpenAI's limit on stop sequences


class _Sampling(BaseModel):
    """Fields both endpoints share. Unknown OpenAI fields (user, logprobs...) are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[Any] = Field(default_factory=list)
    max_completion_tokens: int | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[Any] | None = None
    echo: bool | None = False


def sampling_params(req: _Sampling, max_tokens: int | None, max_tokens_param: str) -> dict[str, Any]:
    """Check the shared knobs against OpenAI's ranges; return what the deployment takes."""
    if req.n is not None and req.n != 1:
        raise InvalidRequest(f"only n=1 is supported, got n={req.n}", param="n")
    if max_tokens is not None and max_tokens < 1:
        raise InvalidRequest(f"{max_tokens_param} must be at least 1, got {max_tokens}", param=max_tokens_param)
    if req.temperature is not None and not 0 <= req.temperature <= 2:
        raise InvalidRequest(f"temperature must be in [0, 2], got {req.temperature}", param="temperature")
    if req.top_p is not None and not 0 < req.top_p <= 1:
        raise InvalidRequest(f"top_p must be in (0, 1], got {req.top_p}", param="top_p")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP:
        raise InvalidRequest(f"at most {MAX_STOP} stop sequences are allowed, got {len(stop)}", param="stop")
    return {
        "max_tokens": max_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "stop": [s for s in stop if s],
        "seed": req.seed,
    }


def chat_messages(raw: list[Any]) -> list[dict[str, str]]:
    """Messages as {"role", "content"} strings; text parts are joined, other parts refused."""
    if not raw:
        raise InvalidRequest("messages must contain at least one message", param="messages")
    out = []
    for i, msg in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise InvalidRequest(f"{where} must be an object with role and content", param=where)
        role = msg.get("role")
        if role not in ROLES:
            raise InvalidRequest(
                f"{where}.role is {role!r}; expected one of: {', '.join(ROLES)}", param=f"{where}.role"
            )
        content = msg.get("content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise InvalidRequest(
                        f"{where}.content[{j}] is not a text part; only text content is supported",
                        param=f"{where}.content",
                    )
                texts.append(part["text"])
            content = "".join(texts)
        elif content is None and role == "assistant":
            content = ""
        elif not isinstance(content, str):
            raise InvalidRequest(f"{where}.content must be a string or a list of text parts", param=f"{where}.content")
        # Chat templates know "system"; OpenAI's newer "developer" role means the same here.
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def completion_prompt(raw: Any) -> str:
    if isinstance(raw, list):
        if len(raw) != 1 or not isinstance(raw[0], str):
            raise InvalidRequest(
                "prompt must be one string (a list of several prompts or token ids is not supported)", param="prompt"
            )
        raw = raw[0]
    if not isinstance(raw, str) or not raw:
        raise InvalidRequest("prompt must be a non-empty string", param="prompt")
    return raw


def _include_usage(req: _Sampling) -> bool:
    return bool((req.stream_options or {}).get("include_usage"))


async def _generate(ctx: Context, model_id: str, response: Response, **kwargs: Any) -> dict[str, Any]:
    started, t0 = time.time(), time.perf_counter()
    try:
        result = await ctx.handles[model_id].generate.remote(**kwargs)
    except Exception as exc:
        raise unwrap(exc) from None
    response.headers.update(await progress.wait_headers(ctx, model_id, started, time.perf_counter() - t0))
    return result


async def _open_stream(ctx: Context, model_id: str, **kwargs: Any) -> tuple[Any, asyncio.Future[Any] | None]:
    """Start a streaming generation and wait briefly for its first event (the model is ready);
    still pending after `progress.GRACE_S`, it is returned for the stream to wait on, sending
    progress lines meanwhile."""
    gen = ctx.handles[model_id].options(stream=True).generate_stream.remote(**kwargs)
    try:
        _, pending = await progress.first_event(gen)
    except Exception as exc:
        gen.cancel()
        raise unwrap(exc) from None
    return gen, pending


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _events(
    gen: Any, chunk: Any, include_usage: bool, first: str | None = None,
    waiting: tuple[Context, str, asyncio.Future[Any]] | None = None,
) -> AsyncIterator[str]:
    """SSE lines for a stream: `chunk(text=..., finish_reason=...)` builds each payload.
    `waiting`: the model is not ready yet; progress comment lines come first."""
    finished = False
    try:
        if waiting is not None:
            ctx, model_id, pending = waiting
            async for line in progress.comments(ctx, model_id, pending):
                yield line
            pending.result()  # a failed load or no room: an error event below
        if first is not None:
            yield _sse(chunk(first=first))
        async for event in gen:
            if "text" in event:
                yield _sse(chunk(text=event["text"]))
            elif "finish_reason" in event:
                yield _sse(chunk(finish_reason=event["finish_reason"]))
                if include_usage:
                    yield _sse(chunk(usage=event["usage"]))
        finished = True
        yield "data: [DONE]\n\n"
    except Exception as exc:
        err = unwrap(exc)
        logger.warning("stream failed after the response started: %s", err)
        if isinstance(err, ServeError):
            yield _sse(err.body())
        else:
            yield _sse(error_body(f"internal error: {type(err).__name__}: {err}", "internal_error"))
        finished = True
    finally:
        if not finished:  # the client went away: stop generating
            gen.cancel()


def _stream_response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    req: ChatCompletionRequest, response: Response, ctx: Context = Depends(request_context)
) -> Any:
    model = ctx.model(req.model, family=FAMILY)
    max_tokens, param = req.max_tokens, "max_tokens"
    if req.max_completion_tokens is not None:
        max_tokens, param = req.max_completion_tokens, "max_completion_tokens"
    params = sampling_params(req, max_tokens, param)
    messages = chat_messages(req.messages)
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    if req.stream:
        gen, pending = await _open_stream(ctx, model.id, messages=messages, **params)
        waiting = (ctx, model.id, pending) if pending is not None else None

        def chunk(
            text: str | None = None, finish_reason: str | None = None, usage: dict[str, int] | None = None,
            first: str | None = None,
        ) -> dict[str, Any]:
            base = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model.id}
            if usage is not None:
                return {**base, "choices": [], "usage": usage}
            delta = {"role": "assistant", "content": ""} if first is not None else {}
            if text is not None:
                delta = {"content": text}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return {**base, "choices": [choice]}

        return _stream_response(_events(gen, chunk, _include_usage(req), first="role", waiting=waiting))

    result = await _generate(ctx, model.id, response, messages=messages, **params)
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model.id,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result["text"]},
                "logprobs": None,
                "finish_reason": result["finish_reason"],
            }
        ],
        "usage": result["usage"],
    }


@router.post("/v1/completions", response_model=None)
async def completions(req: CompletionRequest, response: Response, ctx: Context = Depends(request_context)) -> Any:
    model = ctx.model(req.model, family=FAMILY)
    params = sampling_params(req, req.max_tokens, "max_tokens")
    prompt = completion_prompt(req.prompt)
    completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    if req.stream:
        gen, pending = await _open_stream(ctx, model.id, prompt=prompt, **params)
        waiting = (ctx, model.id, pending) if pending is not None else None

        def chunk(
            text: str | None = None, finish_reason: str | None = None, usage: dict[str, int] | None = None,
            first: str | None = None,
        ) -> dict[str, Any]:
            base = {"id": completion_id, "object": "text_completion", "created": created, "model": model.id}
            if usage is not None:
                return {**base, "choices": [], "usage": usage}
            text = first if first is not None else (text or "")
            return {**base, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}

        first = prompt if req.echo else None
        return _stream_response(_events(gen, chunk, _include_usage(req), first=first, waiting=waiting))

    result = await _generate(ctx, model.id, response, prompt=prompt, **params)
    text = prompt + result["text"] if req.echo else result["text"]
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model.id,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": result["finish_reason"]}],
        "usage": result["usage"],
    }
