"""The two models of a text-to-speech-shaped pipeline, each its own `ManagedModel` deployment.

Two small random-weight torch modules stand in for the two models of a TTS system: an audio
codec (frames of audio <-> discrete codes) and a language model over those codes. Each is its
own `ManagedModel` deployment (loaded lazily, offloaded when idle, evicted like a built-in);
the pipeline deployment holds no weights and runs codec -> language model -> codec:

* `tts` holds both models resident together for the whole request (joint admission);
* `tts-alternate` (`alternate: true` in the config) holds one at a time and offloads each right
  after its step, for a GPU that cannot hold both.

Served by `python -m serve_app run --config examples/byo/serve_config.yaml`:

    curl -s localhost:8000/v1/custom/tts/speak -H 'content-type: application/json' \\
         -d '{"text": "hello there"}' -o hello.wav
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from serve_app import ManagedModel

FRAME = 320  # audio samples per codec frame (20 ms at 16 kHz)
SAMPLE_RATE = 16_000
CODEBOOK = 1024
MiB = 1024**2


def _layers_for(size_mib: float, base_params: int, per_layer_params: int) -> int:
    """How many hidden layers bring a module to about `size_mib` of float32 weights."""
    return max(1, math.ceil((size_mib * MiB / 4 - base_params) / per_layer_params))


def build_codec(size_mib: float, device: str, seed: int = 0) -> Any:
    """The codec stand-in: an MLP encoder to code logits, a code embedding and an MLP decoder."""
    width = 512
    depth = _layers_for(size_mib, 2 * FRAME * width + 2 * CODEBOOK * width, width * width)

    class Codec(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            hidden = [m for _ in range(depth // 2) for m in (nn.Linear(width, width), nn.Tanh())]
            self.encoder = nn.Sequential(nn.Linear(FRAME, width), nn.Tanh(), *hidden)
            self.to_codes = nn.Linear(width, CODEBOOK)
            self.embed = nn.Embedding(CODEBOOK, width)
            self.decoder = nn.Sequential(
                *[m for _ in range(depth - depth // 2) for m in (nn.Linear(width, width), nn.Tanh())],
                nn.Linear(width, FRAME),
            )

        @torch.inference_mode()
        def encode(self, samples: torch.Tensor) -> torch.Tensor:
            frames = nn.functional.pad(samples, (0, (-len(samples)) % FRAME)).view(-1, FRAME)
            return self.to_codes(self.encoder(frames)).argmax(-1)

        @torch.inference_mode()
        def decode(self, codes: torch.Tensor) -> torch.Tensor:
            return torch.tanh(self.decoder(self.embed(codes))).reshape(-1)

    torch.manual_seed(seed)
    return Codec().to(device).eval()


def build_code_lm(size_mib: float, device: str, seed: int = 1) -> Any:
    """The language-model stand-in: residual MLP blocks over the mean of the codes so far."""
    width, hidden = 512, 2048
    blocks = _layers_for(size_mib, 2 * CODEBOOK * width, 2 * width * hidden)

    class CodeLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(CODEBOOK, width)
            self.blocks = nn.ModuleList(
                nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)) for _ in range(blocks)
            )
            self.head = nn.Linear(width, CODEBOOK)

        @torch.inference_mode()
        def generate(self, prompt: torch.Tensor, new_codes: int) -> torch.Tensor:
            codes = prompt.clone()
            for _ in range(new_codes):
                h = self.embed(codes).mean(0)
                for block in self.blocks:
                    h = h + block(h)
                codes = torch.cat([codes, self.head(h).argmax(-1, keepdim=True)])
            return codes[len(prompt) :]

    torch.manual_seed(seed)
    return CodeLM().to(device).eval()


class Codec(ManagedModel):
    """Deployment `codec`: options.size_mib sets its size (default 60 MiB)."""

    def load(self, device: str) -> Any:
        return build_codec(float(self.config.options.get("size_mib", 60)), device)

    async def encode(self, samples: list[float]) -> list[int]:
        return await self.run(lambda codec: codec.encode(torch.tensor(samples, device=codec_device(codec))).tolist())

    async def decode(self, codes: list[int]) -> list[float]:
        return await self.run(lambda codec: codec.decode(torch.tensor(codes, device=codec_device(codec))).tolist())


class LanguageModel(ManagedModel):
    """Deployment `lm`: options.size_mib sets its size (default 100 MiB)."""

    def load(self, device: str) -> Any:
        return build_code_lm(float(self.config.options.get("size_mib", 100)), device)

    async def generate(self, prompt: list[int], new_codes: int) -> list[int]:
        def work(lm: Any) -> list[int]:
            return lm.generate(torch.tensor(prompt, device=codec_device(lm)), new_codes).tolist()

        return await self.run(work)


def codec_device(module: Any) -> Any:
    return next(module.parameters()).device


