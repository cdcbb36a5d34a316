"""POST /v1/audio/transcriptions and /v1/audio/translations, as OpenAI defines them.

Multipart form fields: `file` (required), `model` (required), `language`, `prompt`,
`response_format` (json, text, srt, vtt, verbose_json), `temperature`,
`timestamp_granularities[]` (segment, word; needs verbose_json), `stream` (true: server-sent
events, one `transcript.text.delta` per segment as it is decoded, then `transcript.text.done`).
Translations take the same fields except `language` and always produce English.

The upload limit (`http.max_upload_bytes`) is enforced three times, cheapest first: on the
declared Content-Length, while the body streams in (a chunked upload declares nothing), and
on the file part itself. The body is never spooled past the limit.

Differences from OpenAI, on purpose: `language` in verbose_json is the ISO-639-1 code
("en"), not the English name; segments carry `words` too when word timestamps are asked for.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from deployments.whisper import TranscriptionOptions
from serve_app.api.context import Context, request_context
from serve_app.api.errors import unwrap
from serve_app.errors import InvalidRequest, PayloadTooLarge, ServeError, error_body

router = APIRouter()

RESPONSE_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
GRANULARITIES = ("segment", "word")
#: Room for the multipart boundaries and the small fields next to the file.
FORM_OVERHEAD_BYTES = 64 * 1024
MiB = 1024**2


class TranscriptionForm(BaseModel):
    """The multipart form, declared for /openapi.json. The route parses the form itself (see
    `read_form`), so the upload limit holds while the body streams in."""

    file: bytes = Field(..., json_schema_extra={"format": "binary"}, description="The audio file.")
    model: str = Field(..., description="A served speech model id.")
    language: str | None = Field(None, description="ISO-639-1 code (transcriptions only).")
    prompt: str | None = None
    response_format: Literal["json", "text", "srt", "verbose_json", "vtt"] = "json"
    temperature: float = Field(0.0, ge=0, le=1)
    timestamp_granularities: list[Literal["segment", "word"]] | None = Field(
        None, alias="timestamp_granularities[]", description="word needs verbose_json."
    )
    stream: bool = False


def _form_body(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema(by_alias=True)
    schema["properties"]["file"] = {"type": "string", "format": "binary", "description": "The audio file."}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


@router.post("/v1/audio/transcriptions", openapi_extra=_form_body(TranscriptionForm))
async def create_transcription(request: Request, ctx: Context = Depends(request_context)) -> Response:
    return await _handle(request, ctx, task="transcribe")


@router.post("/v1/audio/translations", openapi_extra=_form_body(TranscriptionForm))
async def create_translation(request: Request, ctx: Context = Depends(request_context)) -> Response:
    return await _handle(request, ctx, task="translate")


async def _handle(request: Request, ctx: Context, task: str) -> Response:
    limit = ctx.config.http.max_upload_bytes
    form = await read_form(request, limit)
    try:
        params = parse_form(form, task=task)
        model = ctx.model(params["model"], family="faster-whisper")
        audio = await _read_file(form.get("file"), limit)
    finally:
        await form.close()
    handle = ctx.handles[model.id]
    options: TranscriptionOptions = params["options"]
    if params["stream"]:
        return await _stream(handle, audio, options, ctx=ctx, model_id=model.id)
    from serve_app.api import progress

    started, t0 = time.time(), time.perf_counter()
    result = await handle.transcribe.remote(audio, options)
    out = format_result(result, params["response_format"], params["granularities"])
    out.headers.update(await progress.wait_headers(ctx, model.id, started, time.perf_counter() - t0))
    return out


# --- request parsing ---------------------------------------------------------------------------


async def read_form(request: Request, limit: int) -> FormData:
    """Parse the multipart body, refusing it with 413 as soon as it is known to be too large."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise InvalidRequest(
            f"expected a multipart/form-data body, got {content_type or 'no content type'!r}; "
            "send the audio as the form field 'file'",
            code="invalid_content_type",
        )
    cap = limit + FORM_OVERHEAD_BYTES
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise _too_large(int(declared), limit, "request body")

    async def capped() -> AsyncIterator[bytes]:
        received = 0
        async for chunk in request.stream():
            received += len(chunk)
            if received > cap:
                raise _too_large(received, limit, "request body")
            yield chunk

    parser = MultiPartParser(request.headers, capped(), max_files=4, max_fields=64)
    try:
        return await parser.parse()
    except MultiPartException as exc:
        raise InvalidRequest(f"malformed multipart body: {exc.message}", code="invalid_multipart") from None


def parse_form(form: FormData, task: str) -> dict[str, Any]:
    """Validate the form fields (not the file); every error names its field."""
    response_format = _text(form, "response_format") or "json"
    if response_format not in RESPONSE_FORMATS:
        raise InvalidRequest(
            f"response_format {response_format!r} is not supported; use one of {', '.join(RESPONSE_FORMATS)}",
            param="response_format",
        )
    raw = form.getlist("timestamp_granularities[]") + form.getlist("timestamp_granularities")
    granularities = [str(g) for g in raw]
    for g in granularities:
        if g not in GRANULARITIES:
            raise InvalidRequest(
                f"timestamp_granularities[] value {g!r} is not supported; use segment or word",
                param="timestamp_granularities[]",
            )
    if granularities and response_format != "verbose_json":
        raise InvalidRequest(
            f"timestamp_granularities[] needs response_format verbose_json, got {response_format!r}",
            param="timestamp_granularities[]",
        )
    temperature_raw = _text(form, "temperature")
    temperature = 0.0
    if temperature_raw:
        try:
            temperature = float(temperature_raw)
        except ValueError:
            temperature = math.nan
        if not 0.0 <= temperature <= 1.0:
            raise InvalidRequest(
                f"temperature must be a number between 0 and 1, got {temperature_raw!r}", param="temperature"
            )
    stream_raw = (_text(form, "stream") or "false").lower()
    if stream_raw not in ("true", "false", "1", "0"):
        raise InvalidRequest(f"stream must be true or false, got {stream_raw!r}", param="stream")
    stream = stream_raw in ("true", "1")
    if stream and response_format not in ("json", "text"):
        raise InvalidRequest(
            f"stream=true sends text events and cannot be combined with response_format {response_format!r}; "
            "use json or text, or turn streaming off",
            param="stream",
        )
    language = _text(form, "language") if task == "transcribe" else None
    options = TranscriptionOptions(
        task="translate" if task == "translate" else "transcribe",
        language=_language_code(language),
        prompt=_text(form, "prompt") or None,
        temperature=temperature,
        word_timestamps="word" in granularities,
    )
    return {
        "model": _text(form, "model"),
        "response_format": response_format,
        "granularities": granularities,
        "stream": stream,
        "options": options,
    }


def _language_code(value: str | None) -> str | None:
    """ISO-639-1, as Whisper names languages: 'EN' and 'en-US' both mean 'en'."""
    if not value or not value.strip():
        return None
    return value.strip().lower().replace("_", "-").split("-")[0]


def _text(form: FormData, name: str) -> str | None:
    value = form.get(name)
    if value is None:
        return None
    if isinstance(value, UploadFile):
        raise InvalidRequest(f"{name} must be a text field, not a file", param=name)
    return value


async def _read_file(value: Any, limit: int) -> bytes:
    if value is None:
        raise InvalidRequest("you must provide an audio file in the form field 'file'", param="file",
                             code="missing_file")
    if not isinstance(value, UploadFile):
        raise InvalidRequest("'file' must be a file upload (multipart file part), not a text field", param="file")
    data = await value.read(limit + 1)
    if len(data) > limit:
        raise _too_large(len(data), limit, "audio file")
    if not data:
        raise InvalidRequest(f"the audio file {value.filename!r} is empty", param="file", code="invalid_audio")
    return data


def _too_large(size: int, limit: int, what: str) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"the {what} is at least {size / MiB:.1f} MiB, more than the upload limit of {limit / MiB:.1f} MiB "
        "(http.max_upload_bytes); compress the audio (mp3, ogg, flac) or split it into shorter files",
        param="file",
    )


# --- responses ---------------------------------------------------------------------------------


def format_result(result: dict[str, Any], response_format: str, granularities: list[str]) -> Response:
    text = result["text"]
    if response_format == "text":
        return PlainTextResponse(text + "\n" if text else "")
    if response_format == "srt":
        return PlainTextResponse(to_srt(result["segments"]))
    if response_format == "vtt":
        return PlainTextResponse(to_vtt(result["segments"]), media_type="text/vtt")
    usage = {"type": "duration", "seconds": math.ceil(result["duration"])}
    if response_format == "json":
        return JSONResponse({"text": text, "usage": usage})
    body: dict[str, Any] = {
        "task": result["task"],
        "language": result["language"],
        "duration": result["duration"],
        "text": text,
        "segments": result["segments"],
        "usage": usage,
    }
    if "word" in granularities:
        body["words"] = [{"word": w["word"].strip(), "start": w["start"], "end": w["end"]}
                         for w in result.get("words") or ()]
    return JSONResponse(body)


def format_timestamp(seconds: float, decimal_marker: str) -> str:
    """`HH:MM:SS,mmm` (SRT) or `HH:MM:SS.mmm` (WebVTT); negative input clamps to zero."""
    ms = max(0, round(seconds * 1000))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal_marker}{ms:03d}"


def to_srt(segments: list[dict[str, Any]]) -> str:
    cues = []
    for i, seg in enumerate(segments, start=1):
        start, end = format_timestamp(seg["start"], ","), format_timestamp(seg["end"], ",")
        cues.append(f"{i}\n{start} --> {end}\n{seg['text'].strip()}\n")
    return "\n".join(cues)


def to_vtt(segments: list[dict[str, Any]]) -> str:
    cues = ["WEBVTT\n"]
    for seg in segments:
        start, end = format_timestamp(seg["start"], "."), format_timestamp(seg["end"], ".")
        cues.append(f"{start} --> {end}\n{seg['text'].strip()}\n")
    return "\n".join(cues)


# --- streaming ---------------------------------------------------------------------------------


async def _stream(
    handle: Any, audio: bytes, options: TranscriptionOptions, *, ctx: Context | None = None, model_id: str = ""
) -> Response:
    """Server-sent events. The first event is awaited before answering, so refusals (queue
    full, bad audio, unsupported task) still get their status code instead of a 200 stream;
    when it takes longer than `progress.GRACE_S` (the model loads or waits for room), the
    stream starts with progress comment lines instead of keeping the client in silence."""
    from serve_app.api import progress

    gen = handle.options(stream=True).transcribe_stream.remote(audio, options)
    pending = None
    try:
        first, pending = await progress.first_event(gen)
    except StopAsyncIteration:
        first = None
    except BaseException:
        gen.cancel()
        raise
    events = sse_events(first, gen) if pending is None or ctx is None else _after_progress(ctx, model_id, pending, gen)
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _after_progress(ctx: Context, model_id: str, pending: Any, gen: Any) -> AsyncIterator[str]:
    from serve_app.api import progress

    handed_on = False
    try:
        async for line in progress.comments(ctx, model_id, pending):
            yield line
        try:
            first = pending.result()
        except StopAsyncIteration:
            first = None
        except Exception as exc:
            yield sse(_error_event(exc))
            return
        handed_on = True
        async for line in sse_events(first, gen):
            yield line
    finally:
        if not handed_on:  # the client left while waiting, or the model failed: stop the replica's work
            gen.cancel()


async def sse_events(first: dict[str, Any] | None, events: Any) -> AsyncIterator[str]:
    """Turn the replica's events into OpenAI's streaming transcription events."""
    pieces: list[str] = []
    finished = False
    try:
        event = first
        while event is not None:
            if event["type"] == "segment":
                delta = event["text"].lstrip() if not pieces else event["text"]
                pieces.append(delta)
                if delta:
                    yield sse({"type": "transcript.text.delta", "delta": delta})
            elif event["type"] == "done":
                finished = True
                yield sse({"type": "transcript.text.done", "text": "".join(pieces).strip()})
                break
            try:
                event = await events.__anext__()
            except StopAsyncIteration:
                event = None
        if not finished:
            raise RuntimeError("the model replica ended the stream without a final event")
    except Exception as exc:
        yield sse(_error_event(exc))
    finally:
        if not finished:
            events.cancel()


def _error_event(exc: BaseException) -> dict[str, Any]:
    exc = unwrap(exc)
    if isinstance(exc, ServeError):
        body = exc.body()
    else:
        body = error_body(f"internal error: {type(exc).__name__}: {exc}", "internal_error")
    return {"type": "error", **body}


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"
