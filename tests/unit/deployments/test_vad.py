"""Streaming Silero VAD and the 24 -> 16 kHz resampler, on espeak-ng speech."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from deployments.vad import Resampler, StreamingVad, pcm16_to_float


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    from faster_whisper.audio import decode_audio

    path = tmp_path_factory.mktemp("vad") / "s.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(path), "The meeting has been moved to Monday."], check=True)
    audio = decode_audio(str(path), sampling_rate=16_000)
    return np.concatenate([np.zeros(16_000, np.float32), audio, np.zeros(16_000, np.float32)])


def test_streaming_probabilities_equal_the_whole_clip(speech: np.ndarray) -> None:
    from faster_whisper.vad import get_vad_model

    n = speech.shape[0] // 512 * 512
    whole = get_vad_model()(speech[:n].copy()).reshape(-1)
    vad = StreamingVad()
    streamed: list[float] = []
    for i in range(0, n, 1_111):  # pieces that do not line up with the windows
        streamed += vad(speech[i : min(i + 1_111, n)])
    np.testing.assert_allclose(streamed, whole[: len(streamed)], atol=1e-5)
    assert len(streamed) == len(whole)
    probs = np.array(streamed)
    assert probs[:25].max() < 0.5 < probs.max()  # silence first, then speech


def test_resampler_in_pieces_matches_the_exact_sine() -> None:
    t24 = np.arange(48_000) / 24_000
    tone = np.sin(2 * np.pi * 440 * t24).astype(np.float32)
    r = Resampler(24_000)
    out = np.concatenate([r(tone[i : i + 777]) for i in range(0, tone.shape[0], 777)])
    assert abs(out.shape[0] - 32_000) <= 1
    exact = np.sin(2 * np.pi * 440 * np.arange(out.shape[0]) / 16_000)
    assert np.max(np.abs(out - exact)) < 0.01
    assert Resampler(16_000)(tone[:100]).shape[0] == 100


def test_pcm16_to_float() -> None:
    data = np.array([0, 16384, -32768], dtype="<i2").tobytes()
    np.testing.assert_allclose(pcm16_to_float(data), [0.0, 0.5, -1.0])
