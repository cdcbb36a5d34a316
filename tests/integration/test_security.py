"""API keys through real Ray Serve and the official openai SDK, and quiet logs for user errors."""

from __future__ import annotations

import glob
import os
import tempfile
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.integration.hardened import ADMIN_KEY, API_KEY, EMB, WHISPER, MiB, admin, ingress_pid, sdk, status

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
    lines: list[str] = []
    tracebacks = 0
    deadline = time.monotonic() + 10.0  # Serve's file handler flushes on a timer: poll, not a fixed sleep
    while not lines and time.monotonic() < deadline:
        time.sleep(0.25)
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


def _temp_fds(pid: int) -> set[str]:
    """Open files of `pid` that are temporary: deleted, or in the temp dir outside Ray's own."""
    ray_dir = os.environ["RAY_TMPDIR"]
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.endswith("(deleted)") or (target.startswith(tempfile.gettempdir()) and ray_dir not in target):
            found.add(f"{fd} -> {target}")
    return found


def test_uploads_leave_no_temporary_file_behind(hardened_url: str) -> None:
    """Uploads above Starlette's spool size (1 MiB) go to an unnamed temporary file (O_TMPFILE on
    Linux); the route closes the form in `finally`, so every path ends with no file open: a
    decoded upload, one refused after parsing, and one cut off at the size limit mid-stream."""
    from starlette.formparsers import MultiPartParser

    url, headers = hardened_url, {"Authorization": f"Bearer {API_KEY}"}
    pid = ingress_pid()
    assert pid is not None, "the ingress process was not found"
    before = _temp_fds(pid)
    big = b"not audio " * (300 * 1024)  # 3 MiB: spooled to disk, not held in memory
    assert len(big) > MultiPartParser.spool_max_size
    with httpx.Client(base_url=url, headers=headers, timeout=120) as http:
        r = http.post("/v1/audio/transcriptions", data={"model": WHISPER}, files={"file": ("big.mp3", big)})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_audio", r.text
        r = http.post("/v1/audio/transcriptions", data={"model": WHISPER, "response_format": "mp4"},
                      files={"file": ("big.mp3", big)})
        assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", r.text
        r = http.post("/v1/audio/transcriptions", data={"model": EMB}, files={"file": ("big.mp3", big)})
        assert r.status_code == 400, r.text  # not a speech model

        boundary = "soakboundary"

        def chunked() -> Iterator[bytes]:  # no Content-Length: the limit must hold while it streams
            yield (f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\n{WHISPER}\r\n'
                   f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="huge.wav"\r\n'
                   "Content-Type: audio/wav\r\n\r\n").encode()
            for _ in range(27):  # 27 MiB, over the 25 MiB limit
                yield b"\0" * MiB

        r = http.post("/v1/audio/transcriptions", content=chunked(),
                      headers={"content-type": f"multipart/form-data; boundary={boundary}"})
        assert r.status_code == 413, r.text
    time.sleep(0.5)
    left = _temp_fds(pid) - before
    assert not left, f"the ingress still holds temporary files open: {sorted(left)}"
