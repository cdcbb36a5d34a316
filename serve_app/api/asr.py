"""WhisperLiveKit's protocol, `GET /asr` (WebSocket), PCM mode: its browser front end works
against this service unchanged.

1. The server sends `{"type": "config", "useAudioWorklet": true}` (PCM input, no WebM).
2. The client sends binary frames of s16le 16 kHz mono; `?language=` sets the language.
3. The server sends state snapshots as text turns into words:
   `{"status", "lines": [{"speaker", "text", "start", "end"}], "buffer_transcription",
   "buffer_diarization", "remaining_time_transcription", "remaining_time_diarization"}`;
   `lines` hold each turn's stable text, `buffer_transcription` the open turn's words not yet
   stable. Times are `H:MM:SS`, as WhisperLiveKit formats them.
4. An empty frame ends the audio: the server transcribes what is left, sends the final lines,
   then `{"type": "ready_to_stop"}`.

Turns come from the same Silero VAD and session engine as `/v1/realtime` (`session.py`); the
model is `?model=`, else the first faster-whisper model. There is no diarization: every line
has speaker 1 (WhisperLiveKit's value with diarization off).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from starlette.websockets import WebSocketState

from deployments.vad import pcm16_to_float
from deployments.whisper import TranscriptionOptions
from serve_app.api.context import get_context
from serve_app.api.realtime import speech_models
from serve_app.api.session import SessionClosed, TranscriptionSession, next_message
from serve_app.core.turns import TurnParams
from serve_app.errors import InvalidRequest, ModelNotFound, ServeError

logger = logging.getLogger("serve_app.api.asr")
router = APIRouter()


def format_time(seconds: float) -> str:
    whole = max(0, int(seconds))
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


@dataclass
class Line:
    item_id: str
    text: str = ""
    start_s: float = 0.0
    end_s: float = 0.0
    done: bool = False


class AsrConnection:
    def __init__(self, ws: WebSocket) -> None:
        self.ws = ws
        self.lines: dict[str, Line] = {}
        self.buffer = ""
        self.session: TranscriptionSession | None = None
        self._lock = asyncio.Lock()
        self._fatal: SessionClosed | None = None
        self._done = asyncio.Event()

    async def send(self, doc: dict[str, Any]) -> None:
        async with self._lock:
            if self.ws.application_state is WebSocketState.CONNECTED:
                with contextlib.suppress(WebSocketDisconnect, RuntimeError):
                    await self.ws.send_text(json.dumps(doc, separators=(",", ":")))

    def snapshot(self) -> dict[str, Any]:
        lines = [
            {"speaker": 1, "text": line.text, "start": format_time(line.start_s), "end": format_time(line.end_s)}
            for line in self.lines.values() if line.text or not line.done
        ]
        pending = self.session.pending_s() if self.session is not None else 0.0
        return {
            "type": "transcript_update",
            "status": "active_transcription" if lines or self.buffer else "no_audio_detected",
            "lines": lines,
            "buffer_transcription": self.buffer,
            "buffer_diarization": "",
            "remaining_time_transcription": round(pending, 1),
            "remaining_time_diarization": 0,
        }

    async def on_event(self, kind: str, data: dict[str, Any]) -> None:
        item = data.get("item_id")
        if kind == "speech_started":
            start = data["audio_start_ms"] / 1000
            self.lines[item] = Line(item, start_s=start, end_s=start)
        elif kind == "partial":
            line = self.lines.setdefault(item, Line(item))
            line.text = data["stable"]
            self.buffer = data["pending"]
            if self.session is not None:
                line.end_s = self.session.position / 16_000
        elif kind == "completed":
            line = self.lines.setdefault(item, Line(item, start_s=data["start_s"]))
            line.text, line.end_s, line.done = data["transcript"], data["end_s"], True
            if not any(not ln.done for ln in self.lines.values()):
                self.buffer = ""
        elif kind == "failed":
            self.lines.pop(item, None)
        else:
            return
        await self.send(self.snapshot())

    async def on_fatal(self, closed: SessionClosed) -> None:
        self._fatal = closed
        body = closed.error.body()["error"]
        logger.warning("asr session: %s: %s", body.get("code"), body.get("message"))
        await self.send({"type": "error", "status": "error", "error": body["message"], "code": body.get("code")})
        self._done.set()

    async def run(self, model: str, language: str | None) -> None:
        ctx = get_context()
        self.session = TranscriptionSession(
            handle=ctx.handles[model], model_id=model, config=ctx.config.realtime, emit=self.on_event,
            on_fatal=self.on_fatal, src_rate=16_000, turn_params=TurnParams(),
            options=TranscriptionOptions(language=language),
        )
        self.session.start()
        await self.send({"type": "config", "useAudioWorklet": True})
        receiver = asyncio.ensure_future(self._receive())
        done = asyncio.ensure_future(self._done.wait())
        try:
            await asyncio.wait({receiver, done}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            receiver.cancel()
            done.cancel()
            await self.session.close()
        if self.ws.application_state is WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                if self._fatal is not None:
                    await self.ws.close(self._fatal.close_code, self._fatal.error.message[:120])
                else:
                    await self.ws.close(1000)

    async def _receive(self) -> None:
        assert self.session is not None
        odd = b""
        while True:
            message = await next_message(self.ws)
            if message is None:
                return
            data = message.get("bytes")
            if data is None:
                await self.send({"type": "error", "status": "error", "code": "invalid_frame",
                                 "error": "send audio as binary frames of s16le 16 kHz mono; an empty frame ends it"})
                continue
            if not data:
                await self.session.finish()
                await self.send(self.snapshot())
                await self.send({"type": "ready_to_stop"})
                return
            data, odd = odd + data, b""
            if len(data) % 2:
                data, odd = data[:-1], data[-1:]
            try:
                await self.session.append(pcm16_to_float(data))
            except ServeError as exc:
                await self.send({"type": "error", "status": "error", "code": exc.code, "error": exc.message})


@router.websocket("/asr")
async def asr(ws: WebSocket) -> None:
    ctx = get_context()
    await ws.accept()
    served = speech_models(ctx)
    model = ws.query_params.get("model") or (served[0] if served else None)
    language = (ws.query_params.get("language") or "").strip().lower().split("-")[0] or None
    if language == "auto":
        language = None
    try:
        if model is None:
            raise InvalidRequest("no faster-whisper model is configured", param="model")
        if model not in served:
            raise ModelNotFound(model, served)
        ctx.require_schedulable(model)
    except ServeError as exc:
        await ws.send_text(json.dumps({"type": "error", "status": "error", "code": exc.code, "error": exc.message}))
        await ws.close(1008, exc.message[:120])
        return
    await AsrConnection(ws).run(model, language)
