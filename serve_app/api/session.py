"""One realtime transcription session in the ingress: audio in, turns and text out.

Both WebSocket protocols (`realtime.py`: OpenAI's; `asr.py`: WhisperLiveKit's) drive this
engine and translate its events. It owns, per session:

* the audio, resampled to 16 kHz, kept from the oldest turn not yet transcribed (plus the
  prefix padding) and capped by `realtime.max_buffered_audio_s`;
* voice activity (Silero, `deployments/vad.py`) and the turn machine (`core/turns.py`), or
  client commits when turn detection is off;
* one worker task that makes at most one model call at a time for the session: the final
  transcription of each ended turn, in order, and between them a re-transcription of the
  growing turn at most every `partial_interval_s`, whose stable prefix (LocalAgreement-2,
  `core/stabilizer.py`) becomes `delta` events;
* the hold on the model (`WhisperDeployment.session`, a streaming call cancelled at close),
  opened at once: an unloaded model starts loading while the audio buffers.

The model calls go through the deployment's handle and queue for its one slot with file
requests. The hold lives on the replica that took it; with `max_replicas` above 1 a turn may
reach another replica, which then serves it under its own lease (as group leases do).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from deployments.vad import Resampler, StreamingVad
from deployments.whisper import TranscriptionOptions
from serve_app.api.errors import unwrap
from serve_app.config import RealtimeConfig
from serve_app.core.stabilizer import Stabilizer
from serve_app.core.turns import SAMPLE_RATE, TurnDetector, TurnParams, ms, samples_of
from serve_app.errors import InvalidRequest, ServeError, SessionLimit

logger = logging.getLogger("serve_app.api.session")

Emit = Callable[[str, dict[str, Any]], Awaitable[None]]
#: OpenAI refuses a commit of less audio than this.
MIN_COMMIT_MS = 100
#: A partial needs at least this much speech, and this much more than the previous one.
MIN_PARTIAL_S = 0.5
PARTIAL_GROWTH_S = 0.25


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"



async def next_message(ws: Any) -> dict[str, Any] | None:
    """The client's next WebSocket message, or None once it has gone (both protocols read so)."""
    from fastapi import WebSocketDisconnect

    try:
        message = await ws.receive()
    except (WebSocketDisconnect, RuntimeError):
        return None
    return None if message["type"] == "websocket.disconnect" else message

@dataclass
class Turn:
    item_id: str
    start: int  # first sample, on the session's 16 kHz timeline
    speech_start: int
    end: int | None = None
    stabilizer: Stabilizer = field(default_factory=Stabilizer)
    last_partial_at: float = 0.0
    last_partial_len: int = 0
    deltas: int = 0


class SessionClosed(Exception):
    """The session must end: `close_code` for the WebSocket, and an error body for the client."""

    def __init__(self, error: ServeError, close_code: int) -> None:
        super().__init__(error.message)
        self.error = error
        self.close_code = close_code


class TranscriptionSession:
    """Turns audio into turn and text events; see the module docstring."""

    def __init__(
        self,
        *,
        handle: Any,
        model_id: str,
        config: RealtimeConfig,
        emit: Emit,
        on_fatal: Callable[[SessionClosed], Awaitable[None]],
        src_rate: int = 24_000,
        turn_params: TurnParams | None = TurnParams(),
        options: TranscriptionOptions | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.handle = handle
        self.model_id = model_id
        self.config = config
        self.emit = emit
        self.on_fatal = on_fatal
        self.clock = clock
        self.id = new_id("sess")
        self.options = options or TranscriptionOptions()
        self.src_rate = src_rate
        self.resampler = Resampler(src_rate)
        self.audio = np.zeros(0, dtype=np.float32)
        self.audio_start = 0  # timeline sample of self.audio[0]
        self.position = 0  # samples received
        self.open_turn: Turn | None = None
        self.vad: StreamingVad | None = None
        self.detector: TurnDetector | None = None
        self.set_turn_detection(turn_params)
        self.finals: deque[Turn] = deque()
        self.previous_item_id: str | None = None
        self.ready = asyncio.Event()
        self.accepted = asyncio.Event()
        self.last_audio_at = clock()
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()  # set after each final transcription
        self._tasks: list[asyncio.Task[Any]] = []
        self._closed = False

    # --- configuration ---------------------------------------------------------------------

    def set_turn_detection(self, params: TurnParams | None) -> None:
        """`None`: the client commits. Changing it mid-turn keeps the turn open."""
        if params is None:
            self.detector = None
            return
        if self.detector is None:  # VAD starts (again) here: its windows count from this sample
            self.vad = StreamingVad()
            position = self.position
        else:
            position = self.detector.position
        speaking = self.open_turn is not None
        self.detector = TurnDetector(params)
        self.detector.position = position
        self.detector.speaking = speaking

    def set_rate(self, rate: int) -> None:
        if rate != self.src_rate:
            self.src_rate = rate
            self.resampler = Resampler(rate)

    # --- life ------------------------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._hold(), name=f"{self.id}-hold"),
            loop.create_task(self._work(), name=f"{self.id}-work"),
            loop.create_task(self._watch_idle(), name=f"{self.id}-idle"),
        ]

    async def close(self) -> None:
        """Cancel the model call in flight (it leaves the replica's queue) and drop the hold."""
        if self._closed:
            return
        self._closed = True
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t

    async def _fatal(self, error: ServeError, close_code: int) -> None:
        if not self._closed:
            await self.on_fatal(SessionClosed(error, close_code))

    async def _hold(self) -> None:
        gen = self.handle.options(stream=True).session.remote(self.id)
        try:
            async for event in gen:
                if event["type"] == "accepted":
                    self.accepted.set()
                    self._wake.set()
                elif event["type"] == "ready":
                    self.ready.set()
                    await self.emit("ready", {"replica": event.get("replica")})
            raise RuntimeError("the model replica ended the session's hold")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            err = unwrap(exc)
            if not isinstance(err, ServeError):
                err = ServeError(f"the model replica failed: {type(err).__name__}: {err}")
            await self._fatal(err, 1013 if isinstance(err, SessionLimit) else 1011)
        finally:
            gen.cancel()

    async def _watch_idle(self) -> None:
        timeout = self.config.session_idle_timeout_s
        while True:
            # A turn waiting for the model is not idleness: the client is waiting for its text.
            if self.finals:
                self.last_audio_at = max(self.last_audio_at, self.clock() - timeout / 2)
            idle = self.clock() - self.last_audio_at
            if idle >= timeout:
                await self._fatal(
                    InvalidRequest(
                        f"no audio for {idle:.0f} s (realtime.session_idle_timeout_s {timeout:g}); the session is "
                        "closed. Open a new one to continue.",
                        code="session_idle_timeout",
                    ),
                    1000,
                )
                return
            await asyncio.sleep(min(1.0, timeout - idle + 0.05))

    # --- audio in --------------------------------------------------------------------------

    def buffered_s(self) -> float:
        return (self.position - self.audio_start) / SAMPLE_RATE

    async def append(self, samples: np.ndarray) -> None:
        """Audio at the source rate, float32. Raises InvalidRequest when the buffer is full."""
        self.last_audio_at = self.clock()
        pcm = self.resampler(samples)
        if self.buffered_s() + pcm.shape[0] / SAMPLE_RATE > self.config.max_buffered_audio_s:
            raise InvalidRequest(
                f"the session holds {self.buffered_s():.1f} s of audio not yet transcribed, the limit "
                f"(realtime.max_buffered_audio_s {self.config.max_buffered_audio_s:g}); the model is behind: "
                "send audio at real-time pace, or retry this chunk later",
                param="audio",
                code="input_audio_buffer_full",
            )
        self.audio = np.concatenate([self.audio, pcm])
        self.position += pcm.shape[0]
        if self.detector is None:
            if self.open_turn is None and pcm.shape[0]:
                self.open_turn = Turn(new_id("item"), self.position - pcm.shape[0], self.position - pcm.shape[0])
        else:
            assert self.vad is not None
            for event in self.detector.push(self.vad(pcm)):
                if event.kind == "speech_started":
                    self.open_turn = Turn(new_id("item"), event.sample, event.speech_sample)
                    await self.emit(
                        "speech_started", {"item_id": self.open_turn.item_id, "audio_start_ms": ms(event.speech_sample)}
                    )
                else:
                    await self._end_turn(event.sample, ms(event.speech_sample))
            turn = self.open_turn
            if turn is not None and self.position - turn.start >= samples_of(self.config.max_turn_s * 1000):
                stop = self.detector.force_stop()
                if stop is not None:
                    await self._end_turn(self.position, ms(stop.speech_sample))
        self._trim()
        self._wake.set()

    async def commit(self) -> None:
        """The client ends the turn (needed with turn detection off; allowed with it on)."""
        turn = self.open_turn
        if turn is None or self.position - turn.start < samples_of(MIN_COMMIT_MS):
            have = 0 if turn is None else ms(self.position - turn.start)
            raise InvalidRequest(
                f"Error committing input audio buffer: buffer too small. Expected at least {MIN_COMMIT_MS}ms "
                f"of audio, but buffer only has {have}ms of audio.",
                code="input_audio_buffer_commit_empty",
            )
        if self.detector is not None:
            self.detector.force_stop()
        await self._end_turn(self.position, ms(self.position), stopped=self.detector is not None)

    async def finish(self) -> None:
        """End of audio: end the open turn (drop it when under 100 ms), wait for every final."""
        turn = self.open_turn
        if turn is not None:
            if self.position - turn.start >= samples_of(MIN_COMMIT_MS):
                if self.detector is not None:
                    self.detector.force_stop()
                await self._end_turn(self.position, ms(self.position), stopped=self.detector is not None)
            else:
                await self.clear()
        while self.finals:
            self._progress.clear()
            await self._progress.wait()

    def pending_s(self) -> float:
        """Audio not yet covered by a transcription: the ended turns waiting, and the open turn
        past its last partial."""
        total = sum((t.end or self.position) - t.start for t in self.finals)
        if self.open_turn is not None:
            total += self.position - self.open_turn.start - self.open_turn.last_partial_len
        return total / SAMPLE_RATE

    async def clear(self) -> None:
        """Drop the open turn's audio (turns already committed are still transcribed)."""
        if self.open_turn is not None:
            self.open_turn = None
            if self.detector is not None:
                self.detector.force_stop()
        self._trim()

    async def _end_turn(self, end: int, speech_end_ms: int, *, stopped: bool = True) -> None:
        turn = self.open_turn
        if turn is None:
            return
        self.open_turn = None
        turn.end = end
        if stopped:
            await self.emit("speech_stopped", {"item_id": turn.item_id, "audio_end_ms": speech_end_ms})
        await self.emit("committed", {"item_id": turn.item_id, "previous_item_id": self.previous_item_id})
        self.previous_item_id = turn.item_id
        self.finals.append(turn)
        self._wake.set()

    def _trim(self) -> None:
        keep_from = self.position - samples_of(1000)  # room for a turn's prefix padding
        for turn in (*self.finals, self.open_turn):
            if turn is not None:
                keep_from = min(keep_from, turn.start)
        keep_from = max(keep_from, self.audio_start)
        if keep_from > self.audio_start:
            self.audio = self.audio[keep_from - self.audio_start :]
            self.audio_start = keep_from

    def _samples(self, start: int, end: int) -> np.ndarray:
        lo = max(0, start - self.audio_start)
        return self.audio[lo : max(lo, end - self.audio_start)].copy()

    # --- the model -------------------------------------------------------------------------

    async def _work(self) -> None:
        await self.accepted.wait()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while True:
                if self.finals:
                    await self._final(self.finals[0])
                    self.finals.popleft()
                    self._trim()
                    self._progress.set()
                    continue
                turn = self.open_turn
                if turn is not None and self._partial_due(turn):
                    await self._partial(turn)
                    continue
                break

    def _partial_due(self, turn: Turn) -> bool:
        length = self.position - turn.start
        return (
            length - (turn.speech_start - turn.start) >= samples_of(MIN_PARTIAL_S * 1000)
            and length - turn.last_partial_len >= samples_of(PARTIAL_GROWTH_S * 1000)
            and self.clock() - turn.last_partial_at >= self.config.partial_interval_s
        )

    async def _call(self, samples: np.ndarray, options: TranscriptionOptions, partial: bool = False) -> Any:
        response = self.handle.transcribe_pcm.remote(samples, options, partial)
        try:
            return await response
        except asyncio.CancelledError:
            response.cancel()  # leaves the replica's queue, or stops at the next segment
            raise

    async def _partial(self, turn: Turn) -> None:
        turn.last_partial_at = self.clock()
        turn.last_partial_len = self.position - turn.start
        samples = self._samples(turn.start, self.position)
        try:
            result = await self._call(samples, replace(self.options, beam_size=1, temperature=0.0), partial=True)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.warning("session %s: partial transcription failed: %s", self.id, unwrap(exc))
            return
        if result is None:
            return  # the model was busy (another turn, a file): try again at the next interval
        if self.open_turn is not turn and turn not in self.finals:
            return  # cleared meanwhile
        delta = turn.stabilizer.update(result["text"])
        if delta:
            turn.deltas += 1
            await self.emit("delta", {"item_id": turn.item_id, "delta": delta})
        await self.emit("partial", {"item_id": turn.item_id, "stable": turn.stabilizer.text,
                                    "pending": turn.stabilizer.pending()})

    async def _final(self, turn: Turn) -> None:
        assert turn.end is not None
        samples = self._samples(turn.start, turn.end)
        duration_s = samples.shape[0] / SAMPLE_RATE
        try:
            result = await self._call(samples, self.options)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            err = unwrap(exc)
            body = err.body()["error"] if isinstance(err, ServeError) else {
                "type": "server_error", "code": "transcription_failed", "message": f"{type(err).__name__}: {err}",
                "param": None,
            }
            logger.warning("session %s: transcription of %s failed: %s", self.id, turn.item_id, body["message"])
            await self.emit("failed", {"item_id": turn.item_id, "error": body})
            return
        tail = turn.stabilizer.finish(result["text"])
        if tail:
            turn.deltas += 1
            await self.emit("delta", {"item_id": turn.item_id, "delta": tail})
        await self.emit(
            "completed",
            {
                "item_id": turn.item_id, "transcript": turn.stabilizer.text, "duration_s": duration_s,
                "start_s": turn.start / SAMPLE_RATE, "end_s": turn.end / SAMPLE_RATE,
            },
        )
