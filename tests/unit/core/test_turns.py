"""Turn edges from voice-activity probabilities (32 ms windows of 512 samples at 16 kHz)."""

from __future__ import annotations

from serve_app.core.turns import TurnDetector, TurnParams, ms

W = 512


def windows(seconds: float) -> int:
    return round(seconds * 16_000 / W)


def test_speech_then_silence_starts_and_stops_one_turn() -> None:
    d = TurnDetector(TurnParams(threshold=0.5, prefix_padding_ms=300, silence_duration_ms=500))
    events = d.push([0.0] * windows(1.0) + [0.9] * windows(2.0) + [0.0] * windows(1.0))
    assert [e.kind for e in events] == ["speech_started", "speech_stopped"]
    start, stop = events
    assert abs(ms(start.speech_sample) - 1000) <= 32
    assert abs(ms(start.sample) - 700) <= 32  # prefix padding
    assert abs(ms(stop.speech_sample) - 3000) <= 32
    assert abs(ms(stop.sample) - 3500) <= 64  # after silence_duration_ms of silence


def test_a_short_pause_does_not_end_the_turn_and_a_click_does_not_start_one() -> None:
    d = TurnDetector(TurnParams(silence_duration_ms=500))
    probs = [0.9] * windows(1.0) + [0.1] * windows(0.3) + [0.9] * windows(1.0) + [0.0] * windows(0.2)
    assert [e.kind for e in d.push(probs)] == ["speech_started"]
    d2 = TurnDetector(TurnParams(min_speech_ms=96))
    assert d2.push([0.0, 0.9, 0.0, 0.0, 0.9, 0.0] * 10) == []


def test_the_lower_end_threshold_keeps_a_hovering_probability_in_the_turn() -> None:
    d = TurnDetector(TurnParams(threshold=0.5, silence_duration_ms=200))
    events = d.push([0.9] * 10 + [0.4] * windows(1.0))  # below 0.5, above 0.35
    assert [e.kind for e in events] == ["speech_started"]


def test_two_turns_and_padding_never_reaches_into_the_previous_turn() -> None:
    d = TurnDetector(TurnParams(prefix_padding_ms=1000, silence_duration_ms=300))
    events = d.push([0.9] * windows(1.0) + [0.0] * windows(0.4) + [0.9] * windows(1.0) + [0.0] * windows(0.4))
    assert [e.kind for e in events] == ["speech_started", "speech_stopped", "speech_started", "speech_stopped"]
    assert events[2].sample >= events[1].sample


def test_pushing_in_pieces_equals_pushing_at_once() -> None:
    probs = [0.0] * 20 + [0.8] * 40 + [0.1] * 30 + [0.7] * 25 + [0.0] * 40
    whole = TurnDetector().push(probs)
    d = TurnDetector()
    pieces = [e for i in range(0, len(probs), 3) for e in d.push(probs[i : i + 3])]
    assert pieces == whole


def test_force_stop_ends_an_open_turn_only() -> None:
    d = TurnDetector()
    assert d.force_stop() is None
    d.push([0.9] * 10)
    stop = d.force_stop()
    assert stop is not None and stop.kind == "speech_stopped" and not d.speaking
