"""Turn detection from voice-activity probabilities: when a turn starts and when it ends.

Pure: the VAD (Silero, `deployments/vad.py`) turns audio into one speech probability per
32 ms window; this machine turns those into `speech_started` / `speech_stopped` at sample
offsets, as OpenAI's `server_vad` does with `threshold`, `prefix_padding_ms` and
`silence_duration_ms`. Two thresholds, as in Silero's own `get_speech_timestamps`: speech
starts above `threshold` and ends below `threshold - 0.15`, so a probability hovering near the
threshold does not split one turn into many.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

SAMPLE_RATE = 16_000
WINDOW_SAMPLES = 512  # Silero's window at 16 kHz


@dataclass(frozen=True)
class TurnParams:
    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500
    #: Speech shorter than this does not start a turn (a click, a breath).
    min_speech_ms: int = 96

    @property
    def end_threshold(self) -> float:
        return max(0.01, self.threshold - 0.15)


@dataclass(frozen=True)
class TurnEvent:
    kind: Literal["speech_started", "speech_stopped"]
    #: started: first sample of the turn's audio (prefix padding included); stopped: the sample
    #: where the detector decided (the turn's audio ends here, trailing silence included).
    sample: int
    #: started: where speech itself began; stopped: where it ended (first silent window).
    speech_sample: int


def ms(samples: int) -> int:
    return samples * 1000 // SAMPLE_RATE


def samples_of(ms_: float) -> int:
    return int(ms_ * SAMPLE_RATE / 1000)


class TurnDetector:
    """Feed window probabilities in order with `push`; it returns the turn edges they cross."""

    def __init__(self, params: TurnParams | None = None, *, window: int = WINDOW_SAMPLES) -> None:
        self.params = params or TurnParams()
        self.window = window
        self.position = 0  # samples seen
        self.speaking = False
        self._run_start: int | None = None  # first sample of the current run of speech windows
        self._silence_start: int | None = None  # first sample of the current run of silent windows
        self._last_end = 0  # a turn's padding never reaches back into the previous turn

    def push(self, probabilities: Iterable[float]) -> list[TurnEvent]:
        p = self.params
        events: list[TurnEvent] = []
        for prob in probabilities:
            start, self.position = self.position, self.position + self.window
            if not self.speaking:
                if prob >= p.threshold:
                    if self._run_start is None:
                        self._run_start = start
                    if self.position - self._run_start >= samples_of(p.min_speech_ms):
                        self.speaking = True
                        begin = max(self._last_end, self._run_start - samples_of(p.prefix_padding_ms), 0)
                        events.append(TurnEvent("speech_started", begin, self._run_start))
                        self._silence_start = None
                else:
                    self._run_start = None
                continue
            if prob < p.end_threshold:
                if self._silence_start is None:
                    self._silence_start = start
                if self.position - self._silence_start >= samples_of(p.silence_duration_ms):
                    events.append(self._stop(self._silence_start))
            else:
                self._silence_start = None
        return events

    def force_stop(self) -> TurnEvent | None:
        """End the turn now (it reached its longest length, or the client committed)."""
        if not self.speaking:
            return None
        return self._stop(self._silence_start if self._silence_start is not None else self.position)

    def _stop(self, speech_end: int) -> TurnEvent:
        self.speaking = False
        self._run_start = None
        self._silence_start = None
        self._last_end = self.position
        return TurnEvent("speech_stopped", self.position, speech_end)
