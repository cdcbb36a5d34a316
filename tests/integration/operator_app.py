"""The app the operator-surface tests share (MCP, events, metrics, the status page): one deploy."""

from __future__ import annotations

import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

from tests.integration.conftest import embeddings_model, fast_autoscaling

MiB = 1024**2
SLOW = "slow-model"
EMBED = "all-MiniLM-L6-v2"
#: Two text models scaled to zero, each cold for one streamed request that waits for its replica.
LM_RAW, LM_SDK = "lm-progress-raw", "lm-progress-sdk"
#: And one for a non-streamed request that waits (its wait and load seconds come as headers).
LM_PLAIN = "lm-progress-plain"

ARGS: dict[str, Any] = {
    "namespace": "gpu-serve-operator-test",
    "models": [
        embeddings_model(idle_timeout_s=None, release_timeout_s=None, resources={"node_a": 1}),
        {
            "id": SLOW, "family": "python", "deployment": "tests.integration.slowmodel:SlowLoading",
            "options": {"load_s": 3.0, "size_mib": 8}, "num_gpus": 0.25, "vram_bytes": 16 * MiB,
            "resources": {"node_b": 1}, "autoscaling": fast_autoscaling(),
            "idle_timeout_s": None, "release_timeout_s": None,
        },
    ],
    "router": {
        "simulated_gpu_bytes": 2048 * MiB, "margin_bytes": 128 * MiB, "margin_fraction": 0.0, "request_timeout_s": 60,
    },
}


@lru_cache(maxsize=1)
def operator_args() -> dict[str, Any]:
    """ARGS plus two small random-weight text models (built once per test run)."""
    from tests.textmodel import build_tiny_causal_lm

    path = build_tiny_causal_lm(Path(tempfile.mkdtemp(prefix="operator-lm-")) / "lm")
    lm = {"family": "transformers-causal-lm", "source": str(path), "num_gpus": 0.25,
          "resources": {"node_a": 1}, "autoscaling": fast_autoscaling()}
    return {**ARGS, "models": [*ARGS["models"], {"id": LM_RAW, **lm}, {"id": LM_SDK, **lm},
                                      {"id": LM_PLAIN, **lm}]}
