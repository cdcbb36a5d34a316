"""API keys through real Ray Serve and the official openai SDK, and quiet logs for user errors."""

from __future__ import annotations

import glob
import os
import time

import httpx
import openai
import pytest

from tests.integration.hardened import ADMIN_KEY, API_KEY, EMB, WHISPER, admin, sdk, status

pytestmark = pytest.mark.integration


def test_inference_needs_a_key_and_the_sdk_sends_it(hardened_url: str) -> None:
    url = hardened_url
    out = sdk(url).embeddings.create(model=EMB, input="with a key")
    assert len(out.data[0].embedding) == 384
    assert sdk(url, ADMIN_KEY).models.list().data, "an admin key may also infer"
    with pytest.raises(openai.AuthenticationError) as info:
        sdk(url, "sk-wrong").embeddings.create(model=EMB, input="without the right key")
    assert info.value.status_code == 401 and info.value.body["code"] == "invalid_api_key"
    r = httpx.post(f"{url}/v1/embeddings", json={"model": EMB, "input": "no key"}, timeout=30)
    assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_admin_commands_need_an_admin_key(hardened_url: str) -> None:
    url = hardened_url
    r = admin(url, "offload", {"model": EMB}, key=API_KEY)
    assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_permissions", r.text
    r = admin(url, "offload", {"model": EMB}, key="sk-wrong")
    assert r.status_code == 401, r.text
    r = httpx.post(f"{url}/gpu/release", json={"model": EMB}, timeout=30)
    assert r.status_code == 401, r.text
    r = admin(url, "offload", {"model": EMB})
    assert r.status_code == 200, r.text
    assert status(url, API_KEY)["models"] and status(url, ADMIN_KEY)["models"]
    assert httpx.get(f"{url}/gpu/status", timeout=30).status_code == 401
    health = httpx.get(f"{url}/health", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok"


def _replica_logs() -> list[str]:
    root = os.environ["RAY_TMPDIR"]
    paths = glob.glob(f"{root}/**/logs/serve/replica_*{WHISPER.replace('.', '-')}*", recursive=True)
    paths += glob.glob(f"{root}/**/logs/serve/replica_*whisper*", recursive=True)
    paths += glob.glob(f"{root}/**/logs/worker-*.err", recursive=True)
    return sorted(set(paths))


def test_undecodable_audio_is_400_and_one_warning_line(hardened_url: str) -> None:
    marker = f"not audio {time.time_ns()}"
    with pytest.raises(openai.BadRequestError) as info:
        sdk(hardened_url, timeout=180).audio.transcriptions.create(
            model=WHISPER, file=("broken.mp3", marker.encode() * 64)
        )
    assert info.value.body["code"] == "invalid_audio"
    time.sleep(2.0)  # Serve's file handler flushes on a timer
    lines, tracebacks = [], 0
    for path in _replica_logs():
        with open(path, errors="replace") as fh:
            text = fh.read()
        for line in text.splitlines():
            if "could not decode the audio file" in line:
                lines.append(line)
        tracebacks += text.count("Traceback") if "invalid_audio" in text or "InvalidRequest" in text else 0
    assert lines, f"the refusal was not logged in any of {_replica_logs()}"
    assert all("WARNING" in line.upper() for line in lines), lines
    assert tracebacks == 0, "a user error logged a traceback"
