"""Family `faster-whisper`: speech to text (transcription, translation to English).

One model instance transcribes one file at a time: CTranslate2 serialises `generate` calls on
one model anyway (`num_workers=1`), and a second file would only double both files' latency.
Requests beyond the running one wait in a bounded queue (`max_queue`); a full queue answers
503 with a Retry-After estimated from recent transcription times, never a hang.

Order of work for one request, and why:

1. queue admission: cheap, so an overloaded replica refuses before doing anything;
2. decoding (PyAV, in a thread) outside the lease: broken audio is refused without loading
   the model, and decoding never holds the model on the GPU;
3. the lease (`lifecycle.use()`): loads or restores the model, keeps offloads away;
4. the one-at-a-time slot, then the model work on the adapter's CTranslate2 thread, the one
   thread that makes every CTranslate2 call for this instance. faster-whisper's `transcribe`
   returns a lazy generator that runs the model as it is consumed: it is consumed to the
   end inside the thread, inside the lease, so an offload can never land mid-generator.

A cancelled request (client gone) stops at the next segment boundary, but its lease is held
until the worker thread has really finished: releasing it on cancellation would let an
offload run while CTranslate2 is still decoding (see `_finish`).

Measured on the 2-core test machine (CPU, int8, tiny.en, other jobs running): load 0.4-1.0 s;
a 5 s clip in 1.5-3 s with one thread (what Ray's OMP_NUM_THREADS gives a replica with
num_cpus < 2) and 0.9-1.9 s with two. Silence makes tiny.en hallucinate " You" with
no_speech_prob 0.95 and avg_logprob -0.96 (just above faster-whisper's -1.0 filter), hence
the silence gate in `Transcriber.transcribe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np
from ray import serve

from serve_app.adapters.ctranslate2 import CTranslate2WhisperAdapter
from serve_app.cluster.replica import ModelReplica
from serve_app.errors import InvalidRequest, QueueFull, SessionLimit

logger = logging.getLogger("serve_app.deployments.whisper")
T = TypeVar("T")

SAMPLE_RATE = 16_000
#: Shortest audio accepted (OpenAI refuses shorter files the same way).
MIN_DURATION_S = 0.1
#: Peak amplitude below this (-60 dBFS) counts as silence: the model is not run on it.
SILENCE_PEAK = 10 ** (-60 / 20)
#: faster-whisper's temperature fallback schedule, used when the request asks for 0.
FALLBACK_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
SUPPORTED_FORMATS = "wav, mp3, flac, ogg, m4a, webm"

EventSink = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class TranscriptionOptions:
    """What a request asks for; built by the HTTP route, carried to the replica."""

    task: Literal["transcribe", "translate"] = "transcribe"
    language: str | None = None
    prompt: str | None = None
    temperature: float = 0.0
    word_timestamps: bool = False
    #: None: the model's default (5). Realtime partials use 1: they are re-done within a second.
    beam_size: int | None = None


def decode_audio_bytes(data: bytes) -> np.ndarray:
    """Decode an uploaded file (any container PyAV/FFmpeg reads) to 16 kHz mono float32."""
    from faster_whisper.audio import decode_audio

    if not data:
        raise InvalidRequest("the audio file is empty", param="file", code="invalid_audio")
    try:
        audio = decode_audio(io.BytesIO(data), sampling_rate=SAMPLE_RATE)
    except Exception as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise InvalidRequest(
            f"could not decode the audio file: {reason}. Send a complete audio file in a supported "
            f"format ({SUPPORTED_FORMATS}).",
            param="file",
            code="invalid_audio",
        ) from None
    duration_s = audio.shape[0] / SAMPLE_RATE
    if duration_s < MIN_DURATION_S:
        raise InvalidRequest(
            f"the audio is too short ({duration_s:.3f} s); the minimum is {MIN_DURATION_S} s",
            param="file",
            code="audio_too_short",
        )
    return audio.astype(np.float32, copy=False)


def is_silent(audio: np.ndarray) -> bool:
    return audio.size == 0 or float(np.max(np.abs(audio))) < SILENCE_PEAK


class Transcriber:
    """The model-side work, separate from Serve so it can be used and tested directly."""

    def __init__(self, adapter: CTranslate2WhisperAdapter, model_id: str, *, beam_size: int = 5) -> None:
        self.adapter = adapter
        self.model_id = model_id
        self.beam_size = beam_size
        #: Learned at the first load; lets later requests be refused before taking a lease.
        self.multilingual: bool | None = None
        self.languages: tuple[str, ...] = ()

    def check(self, options: TranscriptionOptions) -> None:
        """Refuse what this model cannot do. Needs the model loaded, or a previous load."""
        model = self.adapter.model
        if model is not None and self.multilingual is None:
            self.multilingual = bool(model.model.is_multilingual)
            self.languages = tuple(model.supported_languages)
        self.precheck(options)

    def precheck(self, options: TranscriptionOptions) -> None:
        """`check` with what is known without the model (nothing before its first load)."""
        if self.multilingual is None:
            return
        if not self.multilingual:
            if options.task == "translate":
                raise InvalidRequest(
                    f"model {self.model_id!r} is English-only: it has no translation task, and its "
                    "output is already English. Use /v1/audio/transcriptions, or translate with a "
                    "multilingual Whisper model.",
                    param="model",
                    code="translation_not_supported",
                )
            if options.language not in (None, "en"):
                raise InvalidRequest(
                    f"model {self.model_id!r} is English-only and cannot transcribe language "
                    f"{options.language!r}; omit language, send 'en', or use a multilingual model",
                    param="language",
                    code="unsupported_language",
                )
        elif options.language is not None and options.language not in self.languages:
            raise InvalidRequest(
                f"language {options.language!r} is not supported by model {self.model_id!r}; send an "
                f"ISO-639-1 code, one of: {', '.join(self.languages)}",
                param="language",
                code="unsupported_language",
            )

    def transcribe(
        self,
        audio: np.ndarray,
        options: TranscriptionOptions,
        *,
        on_event: EventSink | None = None,
        stop: threading.Event | None = None,
    ) -> dict[str, Any]:
        """Run the model over `audio` to the end (or until `stop` is set); blocking.

        `on_event("info", {...})` is called once the language is known, then
        `on_event("segment", {...})` for each segment as it is decoded.
        """
        self.check(options)
        model = self.adapter.model
        if model is None:
            raise RuntimeError(f"model {self.model_id!r} is not loaded; call it inside the lifecycle's lease")
        duration = round(audio.shape[0] / SAMPLE_RATE, 3)
        segments: list[dict[str, Any]] = []
        generator: Any = ()
        if is_silent(audio):
            language = options.language or "en"
        else:
            temperature: float | tuple[float, ...] = (
                FALLBACK_TEMPERATURES if options.temperature == 0 else options.temperature
            )
            generator, info = model.transcribe(
                audio,
                language=options.language,
                task=options.task,
                initial_prompt=options.prompt or None,
                temperature=temperature,
                word_timestamps=options.word_timestamps,
                beam_size=options.beam_size or self.beam_size,
            )
            language = info.language
        if on_event is not None:
            on_event("info", {"task": options.task, "language": language, "duration": duration})
        # Consumed here, to the end: the generator runs the model lazily.
        for seg in generator:
            item = segment_dict(seg, index=len(segments))
            segments.append(item)
            if on_event is not None:
                on_event("segment", item)
            if stop is not None and stop.is_set():
                break
        result: dict[str, Any] = {
            "task": options.task,
            "language": language,
            "duration": duration,
            "text": "".join(s["text"] for s in segments).strip(),
            "segments": segments,
        }
        if options.word_timestamps:
            result["words"] = [w for s in segments for w in s.get("words") or ()]
        return result


def segment_dict(seg: Any, index: int) -> dict[str, Any]:
    """A faster-whisper Segment in OpenAI's verbose_json shape (ids from 0, plain floats)."""
    item: dict[str, Any] = {
        "id": index,
        "seek": int(seg.seek),
        "start": float(seg.start),
        "end": float(seg.end),
        "text": seg.text,
        "tokens": [int(t) for t in seg.tokens],
        "temperature": float(seg.temperature or 0.0),
        "avg_logprob": float(seg.avg_logprob),
        "compression_ratio": float(seg.compression_ratio),
        "no_speech_prob": float(seg.no_speech_prob),
    }
    if seg.words is not None:
        item["words"] = [
            {"word": w.word, "start": float(w.start), "end": float(w.end), "probability": float(w.probability)}
            for w in seg.words
        ]
    return item


async def _finish(task: Awaitable[T], stop: threading.Event) -> T:
    """Await `task` to its end even if we are cancelled meanwhile, then re-raise the cancel.

    The model work runs in a thread that cancellation cannot stop; returning early would drop
    the lease while CTranslate2 still decodes, and an offload could then run under it. A
    cancel sets `stop`, so the worker ends at the next segment boundary.
    """
    fut = asyncio.ensure_future(task)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(fut)
            break
        except asyncio.CancelledError:
            if fut.done():
                raise
            stop.set()
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return result


@serve.deployment
class WhisperDeployment(ModelReplica):
    def __init__(self, model: dict[str, Any], app: dict[str, Any]) -> None:
        super().__init__(model, app)
        self.transcriber = Transcriber(self.adapter, self.config.id)
        self._slot = asyncio.Semaphore(1)
        self._admitted = 0  # requests between queue admission and the end of their model work
        self._job_s = 2.0  # moving average of one transcription's duration, for Retry-After
        self._sessions = 0  # open realtime sessions on this replica, from admission to close

    def make_adapter(self) -> CTranslate2WhisperAdapter:
        # CTranslate2 would follow OMP_NUM_THREADS, which Ray sets to 1 for a replica with
        # num_cpus below 2; `cpu_threads` gives it the cores (see `replica.cpu_threads`).
        return CTranslate2WhisperAdapter(
            self.config.resolve_source(), self.config.compute_type, cpu_threads=self.cpu_threads
        )

    # --- called through the Serve handle ----------------------------------------------------

    async def transcribe(self, audio: bytes, options: TranscriptionOptions) -> dict[str, Any]:
        """Transcribe (or translate) one uploaded file; the whole result at once."""
        async with self._admission():
            samples = await asyncio.to_thread(decode_audio_bytes, audio)
            del audio
            self.transcriber.precheck(options)
            async with self.lifecycle.use():
                self.transcriber.check(options)
                async with self._slot:
                    stop = threading.Event()
                    work = self._timed(self.transcriber.transcribe, samples, options, stop=stop)
                    return await _finish(work, stop)

    async def transcribe_stream(self, audio: bytes, options: TranscriptionOptions) -> AsyncIterator[dict[str, Any]]:
        """Yield `{"type": "info"}`, then `{"type": "segment"}` per segment as decoded, then
        `{"type": "done"}` with the whole result. Call with `handle.options(stream=True)`.

        Errors before the first event (queue full, bad audio, unsupported task) raise before
        anything is yielded, so the HTTP route can still answer with a status code.
        """
        async with self._admission():
            samples = await asyncio.to_thread(decode_audio_bytes, audio)
            del audio
            self.transcriber.precheck(options)
            async with self.lifecycle.use():
                self.transcriber.check(options)
                async with self._slot:
                    loop = asyncio.get_running_loop()
                    events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
                    stop = threading.Event()

                    def emit(kind: str, data: Any) -> None:
                        loop.call_soon_threadsafe(events.put_nowait, (kind, data))

                    def work() -> None:
                        try:
                            result = self.transcriber.transcribe(samples, options, on_event=emit, stop=stop)
                        except BaseException as exc:
                            emit("error", exc)
                        else:
                            emit("done", result)

                    worker = asyncio.ensure_future(self._timed(work))
                    try:
                        while True:
                            kind, data = await events.get()
                            if kind == "error":
                                raise data
                            yield {"type": kind, **data}
                            if kind == "done":
                                return
                    finally:
                        stop.set()
                        await _finish(worker, stop)

    async def session(self, session_id: str) -> AsyncIterator[dict[str, Any]]:
        """Hold the model resident for one realtime session; call with `stream=True`.

        Yields `{"type": "accepted"}` at once, `{"type": "ready"}` once the model is loaded,
        then nothing until the caller cancels the stream at the session's end. Over
        `realtime.max_sessions_per_replica` it raises `SessionLimit` before yielding. The
        session's turns come separately (`transcribe_pcm`) and queue for the slot with files.
        """
        limit = self.app_config.realtime.max_sessions_per_replica
        if self._sessions >= limit:
            raise SessionLimit(
                f"model {self.config.id!r}: this replica holds {self._sessions} realtime sessions, its limit "
                f"(realtime.max_sessions_per_replica {limit}); retry later, or raise the limit or "
                "autoscaling.max_replicas",
                retry_after_s=5.0,
            )
        self._sessions += 1
        logger.info("realtime session %s opened on %s (%d open)", session_id, self.link.replica_id, self._sessions)
        try:
            yield {"type": "accepted", "replica": self.link.replica_id}
            async with self.lifecycle.hold():
                yield {"type": "ready", "replica": self.link.replica_id, "state": self.lifecycle.state.value}
                await asyncio.Event().wait()  # until the caller cancels
        finally:
            self._sessions -= 1
            logger.info("realtime session %s closed (%d open)", session_id, self._sessions)

    async def transcribe_pcm(
        self, samples: np.ndarray, options: TranscriptionOptions, partial: bool = False
    ) -> dict[str, Any] | None:
        """Transcribe one turn of a realtime session (16 kHz float32), in the slot's queue with
        file requests. Not counted against `max_queue`: a session has at most one call in flight.

        A `partial` (the growing turn, re-done for its stable prefix) never queues: while the
        slot is taken it returns None at once and the session tries again later. Queued, two
        sessions' partials kept the slot full and each final waited behind the other session's
        partials (end of speech to text: p50 2.4 s with two sessions against 1.0 s with one).
        """
        self.transcriber.precheck(options)
        if partial and self._slot.locked():
            return None
        async with self.lifecycle.use():
            self.transcriber.check(options)
            async with self._slot:
                stop = threading.Event()
                return await _finish(self._timed(self.transcriber.transcribe, samples, options, stop=stop), stop)

    # --- helpers ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _admission(self) -> AsyncIterator[None]:
        limit = self.config.max_queue + 1  # the one running, plus the queue
        if self._admitted >= limit:
            retry_after_s = self._job_s * self._admitted
            raise QueueFull(
                f"model {self.config.id!r} is transcribing one file and {self._admitted - 1} more are "
                f"queued (max_queue {self.config.max_queue}); retry in about {retry_after_s:.0f}s, or "
                "raise max_queue or autoscaling.max_replicas for this model",
                retry_after_s=retry_after_s,
            )
        self._admitted += 1
        try:
            yield
        finally:
            self._admitted -= 1

    async def _timed(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Model work on the adapter's CTranslate2 thread (see `serve_app.adapters.ctranslate2`)."""
        start = time.perf_counter()
        try:
            return await asyncio.wrap_future(self.adapter.submit(fn, *args, **kwargs))
        finally:
            self._job_s = 0.7 * self._job_s + 0.3 * (time.perf_counter() - start)
