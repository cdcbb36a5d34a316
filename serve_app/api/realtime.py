"""OpenAI's Realtime transcription protocol: `GET /v1/realtime?intent=transcription` (WebSocket).

GA event shapes (openai-python `types/realtime/`). Client events: `session.update` (with
`session.type: "transcription"`), `input_audio_buffer.append` / `.commit` / `.clear`; the beta
`transcription_session.update` (flat `input_audio_format`, `input_audio_transcription`,
`turn_detection`) is accepted too and answered by `transcription_session.updated`. Server
events: `session.created` / `session.updated`, `input_audio_buffer.speech_started` /
`speech_stopped` / `committed` / `cleared`,
`conversation.item.input_audio_transcription.delta` / `completed` / `failed`, and `error`.

A bad event gets an `error` event (with the client's `event_id`) and the session goes on. The
session ends with a close code: 1013 when the replica is at its session limit (try again
later), 1000 after `realtime.session_idle_timeout_s` without audio, 1011 when the model
replica fails. The model is the query's `model`, else `session.update`'s
`transcription.model`, else the first faster-whisper model configured.

Differences from OpenAI, on purpose: `audio/pcm` at 16 kHz is accepted besides 24 kHz (a
browser can send its capture rate's resampling without a second resampler), and
`noise_reduction` is accepted and ignored.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import math
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from starlette.websockets import WebSocketState

from deployments.vad import pcm16_to_float
from deployments.whisper import TranscriptionOptions
from serve_app.api.context import Context, get_context
from serve_app.api.session import SessionClosed, TranscriptionSession, new_id, next_message
from serve_app.core.turns import TurnParams
from serve_app.errors import InvalidRequest, ModelNotFound, ServeError

logger = logging.getLogger("serve_app.api.realtime")
router = APIRouter()

#: OpenAI's limit on one `input_audio_buffer.append` event's audio (base64). The Serve proxy
#: closes a WebSocket on any message over 16 MiB (1009), so a larger one never reaches us.
MAX_APPEND_BYTES = 15 * 1024**2
RATES = (24_000, 16_000)
PCM_TYPES = ("audio/pcm", "pcm16")
EVENT_TYPES = (
    "session.update", "transcription_session.update", "input_audio_buffer.append", "input_audio_buffer.commit",
    "input_audio_buffer.clear",
)
DEFAULT_TURN = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500}


def speech_models(ctx: Context) -> list[str]:
    return [m.id for m in ctx.config.models if m.family == "faster-whisper"]


class RealtimeConnection:
    """One WebSocket: parses client events, keeps the session settings, sends server events."""

    def __init__(self, ws: WebSocket, ctx: Context, *, beta: bool) -> None:
        self.ws = ws
        self.ctx = ctx
        self.beta = beta
        self.session: TranscriptionSession | None = None
        self.model: str | None = None
        self.language: str | None = None
        self.prompt: str | None = None
        self.rate = 24_000
        self.turn: dict[str, Any] | None = dict(DEFAULT_TURN)
        self.noise_reduction: Any = None
        self.include: list[str] | None = None
        self.session_id = new_id("sess")
        self._send_lock = asyncio.Lock()
        self._closing: SessionClosed | None = None
        self._done = asyncio.Event()

    # --- sending ---------------------------------------------------------------------------

    async def send(self, event: dict[str, Any]) -> None:
        event = {"type": event.pop("type"), "event_id": new_id("event"), **event}
        async with self._send_lock:
            if self.ws.application_state is WebSocketState.CONNECTED:
                with contextlib.suppress(WebSocketDisconnect, RuntimeError):
                    await self.ws.send_text(json.dumps(event, separators=(",", ":")))

    async def send_error(self, exc: BaseException, client_event_id: str | None = None) -> None:
        if isinstance(exc, ServeError):
            body = exc.body()["error"]
        else:
            body = {"type": "server_error", "code": "internal_error", "message": f"{type(exc).__name__}: {exc}",
                    "param": None}
        logger.warning("realtime %s: error %s: %s", self.session_id, body.get("code"), body.get("message"))
        await self.send({"type": "error", "error": {**body, "event_id": client_event_id}})

    def session_object(self) -> dict[str, Any]:
        transcription = {"model": self.model, "language": self.language, "prompt": self.prompt or ""}
        if self.beta:
            return {
                "id": self.session_id, "object": "realtime.transcription_session", "input_audio_format": "pcm16",
                "input_audio_transcription": transcription, "turn_detection": self.turn,
                "input_audio_noise_reduction": self.noise_reduction, "include": self.include,
            }
        return {
            "type": "transcription", "id": self.session_id, "object": "realtime.transcription_session",
            "audio": {"input": {
                "format": {"type": "audio/pcm", "rate": self.rate}, "transcription": transcription,
                "turn_detection": self.turn, "noise_reduction": self.noise_reduction,
            }},
            "include": self.include,
        }

    # --- the session's events --------------------------------------------------------------

    async def on_session_event(self, kind: str, data: dict[str, Any]) -> None:
        item = data.get("item_id")
        if kind == "speech_started":
            await self.send({"type": "input_audio_buffer.speech_started", "audio_start_ms": data["audio_start_ms"],
                             "item_id": item})
        elif kind == "speech_stopped":
            await self.send({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": data["audio_end_ms"],
                             "item_id": item})
        elif kind == "committed":
            await self.send({"type": "input_audio_buffer.committed", "item_id": item,
                             "previous_item_id": data["previous_item_id"]})
        elif kind == "delta":
            await self.send({"type": "conversation.item.input_audio_transcription.delta", "item_id": item,
                             "content_index": 0, "delta": data["delta"]})
        elif kind == "completed":
            await self.send({
                "type": "conversation.item.input_audio_transcription.completed", "item_id": item,
                "content_index": 0, "transcript": data["transcript"],
                "usage": {"type": "duration", "seconds": math.ceil(data["duration_s"] * 10) / 10},
            })
        elif kind == "failed":
            await self.send({"type": "conversation.item.input_audio_transcription.failed", "item_id": item,
                             "content_index": 0, "error": data["error"]})

    async def on_fatal(self, closed: SessionClosed) -> None:
        self._closing = closed
        await self.send_error(closed.error)
        self._done.set()

    # --- settings --------------------------------------------------------------------------

    def _options(self) -> TranscriptionOptions:
        return TranscriptionOptions(language=self.language, prompt=self.prompt or None)

    def _turn_params(self) -> TurnParams | None:
        if self.turn is None:
            return None
        return TurnParams(
            threshold=float(self.turn.get("threshold", 0.5)),
            prefix_padding_ms=int(self.turn.get("prefix_padding_ms", 300)),
            silence_duration_ms=int(self.turn.get("silence_duration_ms", 500)),
        )

    def select_model(self, model: str | None) -> None:
        """Check the model; open the session on it (or move the session to it)."""
        model = self.check_model(model)
        if self.session is not None and model == self.model:
            return
        old, self.model = self.session, model
        if old is not None:
            asyncio.get_running_loop().create_task(old.close())
        self.session = TranscriptionSession(
            handle=self.ctx.handles[model], model_id=model, config=self.ctx.config.realtime,
            emit=self.on_session_event, on_fatal=self.on_fatal, src_rate=self.rate,
            turn_params=self._turn_params(), options=self._options(),
        )
        self.session.id = self.session_id
        self.session.start()

    def check_model(self, model: str | None) -> str:
        served = speech_models(self.ctx)
        if model is None:
            model = self.model or (served[0] if served else None)
        if model is None:
            raise InvalidRequest("no faster-whisper model is configured", param="model", code="model_not_found")
        if model not in served:
            if self.ctx.config.model(model) is None:
                raise ModelNotFound(model, served)
            raise InvalidRequest(
                f"model {model!r} is not a speech model and cannot transcribe; configured faster-whisper models: "
                f"{', '.join(served)}",
                param="session.audio.input.transcription.model", code="model_not_supported",
            )
        self.ctx.require_schedulable(model)
        return model

    def apply_update(self, event: dict[str, Any]) -> None:
        """Validate the whole update first, then apply it: a bad field changes nothing."""
        session = event.get("session")
        if not isinstance(session, dict):
            raise InvalidRequest("session must be an object", param="session")
        if event["type"] == "transcription_session.update":
            fmt = session.get("input_audio_format", "pcm16")
            if fmt != "pcm16":
                raise InvalidRequest(
                    f"input_audio_format {fmt!r} is not supported; send pcm16 (24 kHz mono little-endian)",
                    param="session.input_audio_format", code="invalid_audio_format",
                )
            rate = 24_000
            transcription = session.get("input_audio_transcription")
            turn_present, turn = "turn_detection" in session, session.get("turn_detection")
            noise = session.get("input_audio_noise_reduction", self.noise_reduction)
            self.beta = True
        else:
            kind = session.get("type", "transcription")
            if kind != "transcription":
                raise InvalidRequest(
                    f"session.type {kind!r} is not served here; this endpoint transcribes: use \"transcription\" "
                    "(with ?intent=transcription)",
                    param="session.type", code="invalid_session_type",
                )
            audio_in = ((session.get("audio") or {}).get("input")) or {}
            fmt = audio_in.get("format") or {"type": "audio/pcm", "rate": self.rate}
            if not isinstance(fmt, dict) or fmt.get("type") not in PCM_TYPES:
                got = fmt.get("type") if isinstance(fmt, dict) else fmt
                raise InvalidRequest(
                    f"audio format {got!r} is not supported; send {{\"type\": \"audio/pcm\", \"rate\": 24000}} "
                    "(PCM16 mono little-endian)",
                    param="session.audio.input.format.type", code="invalid_audio_format",
                )
            rate = fmt.get("rate", 24_000)
            if rate not in RATES:
                raise InvalidRequest(
                    f"audio rate {rate!r} is not supported; use 24000 (or 16000)",
                    param="session.audio.input.format.rate", code="invalid_audio_format",
                )
            transcription = audio_in.get("transcription")
            turn_present, turn = "turn_detection" in audio_in, audio_in.get("turn_detection")
            noise = audio_in.get("noise_reduction", self.noise_reduction)
        if transcription is not None and not isinstance(transcription, dict):
            raise InvalidRequest("transcription must be an object", param="transcription")
        transcription = transcription or {}
        if turn_present and turn is not None:
            turn = self._check_turn(turn)
        model = self.check_model(transcription.get("model") or self.model)
        language = transcription.get("language", self.language) or None
        if language is not None and not isinstance(language, str):
            raise InvalidRequest("language must be an ISO-639-1 code", param="transcription.language")
        prompt = transcription.get("prompt", self.prompt)
        # Everything checked: apply.
        self.rate = int(rate)
        self.language = language.strip().lower().split("-")[0] if language else None
        self.prompt = prompt or None
        self.noise_reduction = noise
        if "include" in session:
            self.include = session.get("include")
        if turn_present:
            self.turn = turn
        self.select_model(model)
        assert self.session is not None
        self.session.set_rate(self.rate)
        self.session.options = self._options()
        if turn_present:
            self.session.set_turn_detection(self._turn_params())

    @staticmethod
    def _check_turn(turn: Any) -> dict[str, Any]:
        if not isinstance(turn, dict) or turn.get("type", "server_vad") != "server_vad":
            got = turn.get("type") if isinstance(turn, dict) else turn
            raise InvalidRequest(
                f"turn_detection type {got!r} is not supported; use server_vad, or null to commit yourself",
                param="turn_detection.type", code="invalid_turn_detection",
            )
        out = {**DEFAULT_TURN, **{k: v for k, v in turn.items() if v is not None}}
        threshold = out["threshold"]
        if not isinstance(threshold, int | float) or not 0 < threshold < 1:
            raise InvalidRequest(f"turn_detection.threshold must be in (0, 1), got {threshold!r}",
                                 param="turn_detection.threshold")
        for key in ("prefix_padding_ms", "silence_duration_ms"):
            if not isinstance(out[key], int) or not 0 <= out[key] <= 10_000:
                raise InvalidRequest(f"turn_detection.{key} must be an integer of 0 to 10000 ms, got {out[key]!r}",
                                     param=f"turn_detection.{key}")
        return out

    # --- the receive loop ------------------------------------------------------------------

    async def handle(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind in ("session.update", "transcription_session.update"):
            self.apply_update(event)
            updated = "transcription_session.updated" if kind == "transcription_session.update" else "session.updated"
            await self.send({"type": updated, "session": self.session_object()})
            return
        if kind not in EVENT_TYPES:
            raise InvalidRequest(
                f"unknown event type {kind!r}; this endpoint accepts {', '.join(EVENT_TYPES)}",
                param="type", code="unknown_event_type",
            )
        if self.session is None:
            self.select_model(None)
        assert self.session is not None
        if kind == "input_audio_buffer.append":
            await self.session.append(decode_append(event))
        elif kind == "input_audio_buffer.commit":
            await self.session.commit()
        elif kind == "input_audio_buffer.clear":
            await self.session.clear()
            await self.send({"type": "input_audio_buffer.cleared"})

    async def run(self, query_model: str | None) -> None:
        error: ServeError | None = None
        try:
            self.select_model(query_model)  # at once: an unloaded model starts loading now
        except ServeError as exc:
            error = exc
        await self.send({"type": "transcription_session.created" if self.beta else "session.created",
                         "session": self.session_object()})
        if error is not None:
            await self.send_error(error)
        receiver = asyncio.ensure_future(self._receive())
        done = asyncio.ensure_future(self._done.wait())
        try:
            await asyncio.wait({receiver, done}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            receiver.cancel()
            done.cancel()
            if self.session is not None:
                await self.session.close()
        if self._closing is not None and self.ws.application_state is WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                await self.ws.close(self._closing.close_code, self._closing.error.message[:120])

    async def _receive(self) -> None:
        while True:
            message = await next_message(self.ws)
            if message is None:
                return
            text = message.get("text")
            if text is None:
                await self.send_error(InvalidRequest(
                    "binary frames are not part of this protocol; send JSON events (audio as base64 in "
                    "input_audio_buffer.append)", code="invalid_event"))
                continue
            event_id = None
            try:
                event = json.loads(text)
                if not isinstance(event, dict):
                    raise InvalidRequest("an event must be a JSON object with a type", code="invalid_event")
                event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
                await self.handle(event)
            except json.JSONDecodeError as exc:
                await self.send_error(InvalidRequest(f"the event is not valid JSON: {exc}", code="invalid_json"))
            except ServeError as exc:
                await self.send_error(exc, event_id)


def decode_append(event: dict[str, Any]) -> Any:
    audio = event.get("audio")
    if not isinstance(audio, str):
        raise InvalidRequest("input_audio_buffer.append needs audio: base64 PCM16 mono", param="audio",
                             code="invalid_audio")
    if len(audio) > MAX_APPEND_BYTES:
        raise InvalidRequest(
            f"the audio of one append is {len(audio) / 1024**2:.1f} MiB of base64, over the limit of 15 MiB; "
            "send smaller chunks (20-100 ms each is typical)",
            param="audio", code="audio_too_large",
        )
    try:
        data = base64.b64decode(audio, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("audio is not valid base64; send base64-encoded PCM16 mono", param="audio",
                             code="invalid_base64") from None
    if len(data) % 2:
        raise InvalidRequest(f"audio has {len(data)} bytes, an odd count: PCM16 samples are 2 bytes each",
                             param="audio", code="invalid_audio")
    return pcm16_to_float(data)


@router.websocket("/v1/realtime")
async def realtime(ws: WebSocket) -> None:
    ctx = get_context()
    intent = ws.query_params.get("intent")
    offered = [p.strip() for p in ws.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
    await ws.accept(subprotocol="realtime" if "realtime" in offered else None)
    beta = ws.headers.get("openai-beta", "").startswith("realtime=v1")
    conn = RealtimeConnection(ws, ctx, beta=beta)
    if intent not in (None, "transcription"):
        await conn.send_error(InvalidRequest(
            f"intent {intent!r} is not served here: this service transcribes; connect with ?intent=transcription",
            param="intent", code="invalid_intent"))
        await ws.close(1008, "use ?intent=transcription")
        return
    try:
        await conn.run(ws.query_params.get("model"))
    except Exception as exc:  # a bug, not the client's: say so, and close as an internal error
        logger.exception("realtime session %s failed", conn.session_id)
        await conn.send_error(exc)
        if ws.application_state is WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                await ws.close(1011, "internal error")
