"""The pipeline deployment of examples/byo: no weights of its own, codec -> language model -> codec.

It imports no torch (its replicas stay small); the models are deployments of their own
(`examples/byo/models.py`), reached by handle through `use_models`.
"""

from __future__ import annotations

import io
import math
import time
import wave

from fastapi import APIRouter, Depends, Response
from pydantic import BaseModel, Field

from serve_app import ManagedModel, deployment

FRAME = 320  # the codec's frame, in samples (examples/byo/models.py)
SAMPLE_RATE = 16_000
CODEBOOK = 1024


class SpeakRequest(BaseModel):
    text: str = Field(..., min_length=1, max_length=2000, description="What to say.")
    codes_per_char: int = Field(2, ge=1, le=8, description="Audio codes generated per character of text.")


routes = APIRouter()


class TtsPipeline(ManagedModel):
    """Deployment `tts` (and `tts-alternate`): no weights of its own; codec -> LM -> codec."""

    routes = routes

    def load(self, device: str) -> None:
        return None

    async def speak(self, text: str, codes_per_char: int = 2) -> tuple[list[float], dict[str, float]]:
        timings: dict[str, float] = {}
        start = time.perf_counter()
        # A reference "voice" clip: the codec encodes it into the codes that prompt the LM.
        voice = [math.sin(2 * math.pi * 220 * i / SAMPLE_RATE) * 0.3 for i in range(FRAME * 8)]
        prompt = [b % CODEBOOK for b in text.encode()]
        # The member ids are options so one class can serve several pipelines (default: codec, lm).
        members = self.config.options.get("codec", "codec"), self.config.options.get("lm", "lm")
        async with self.use_models(*members) as (codec, lm):
            timings["admitted_s"] = time.perf_counter() - start
            voice_codes = await codec.encode(voice)
            codes = await lm.generate(prompt + voice_codes, codes_per_char * len(text))
            audio = await codec.decode(codes)
        timings["total_s"] = time.perf_counter() - start
        return audio, timings


def wav_bytes(samples: list[float]) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(b"".join(int(max(-1.0, min(1.0, s)) * 32767).to_bytes(2, "little", signed=True) for s in samples))
    return buf.getvalue()


@routes.post("/speak", response_class=Response)
async def speak(body: SpeakRequest, pipeline: TtsPipeline = Depends(deployment)) -> Response:
    """Text in, a 16 kHz mono WAV out; timings in the X-Timings header."""
    audio, timings = await pipeline.speak(body.text, body.codes_per_char)
    header = ", ".join(f"{k}={v:.4f}" for k, v in timings.items())
    return Response(content=wav_bytes(audio), media_type="audio/wav", headers={"X-Timings": header})
