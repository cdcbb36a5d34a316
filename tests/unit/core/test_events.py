"""Event records, the numbered ring, the dropping buffer and the decision filter."""

from __future__ import annotations

import pytest

from serve_app.core.events import DecisionFilter, DropBuffer, Event, EventLog, humanise_bytes, reason_category


def ev(model: str = "m", **kw: object) -> Event:
    return Event(kind="transition", at=1.0, model=model, from_state="loading", to_state="gpu", **kw)  # type: ignore[arg-type]


def test_event_dict_uses_from_and_to_and_drops_empty_fields() -> None:
    d = ev(seconds=0.8, bytes=90).as_dict()
    assert d["from"] == "loading" and d["to"] == "gpu" and d["seconds"] == 0.8 and d["bytes"] == 90
    assert "action" not in d and "from_state" not in d


def test_move_names_the_timed_transition() -> None:
    assert ev().move == "load"
    assert Event("transition", 0, "m", from_state="gpu", to_state="offloading").move is None
    assert Event("decision", 0, "m", action="evict").move is None


def test_log_numbers_events_and_reads_from_a_sequence_number() -> None:
    log = EventLog(capacity=3)
    for i in range(5):
        log.append(ev(model=f"m{i}"))
    assert log.last_seq == 5
    events, missed = log.since(0)
    assert [e.seq for e in events] == [3, 4, 5] and missed == 2  # 1 and 2 left the ring
    events, missed = log.since(3)
    assert [e.model for e in events] == ["m3", "m4"] and missed == 0
    assert log.since(5) == ([], 0)
    assert [e.seq for e in log.since(2, limit=1)[0]] == [3]


def test_log_rejects_a_zero_capacity() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        EventLog(0)


def test_drop_buffer_keeps_the_newest_and_counts_what_it_dropped() -> None:
    buf = DropBuffer(2)
    for i in range(5):
        buf.put(i)
    assert len(buf) == 2 and buf.drain() == [3, 4]
    assert buf.take_dropped() == 3 and buf.take_dropped() == 0
    assert buf.drain() == []


def test_decision_filter_passes_a_wait_only_when_its_reason_changes() -> None:
    f = DecisionFilter()
    assert f.changed("wait", "r1", "no room")
    assert not f.changed("wait", "r1", "no room")
    assert f.changed("wait", "r1", "2 loads in flight")
    assert f.changed("wait", "r2", "no room")
    assert f.changed("admit", "r1", "fits")  # every admit passes, and ends the request's wait
    assert f.changed("wait", "r1", "2 loads in flight")
    assert f.changed("evict", None, "idle")
    assert f.changed("evict", None, "idle")
    f.forget(["r1"])
    assert f.changed("wait", "r2", "no room")  # forgotten: a new request with the same id is news
    assert not f.changed("wait", "r1", "2 loads in flight")


@pytest.mark.parametrize(
    ("reason", "category"),
    [
        ("idle 301.0s >= idle_timeout_s 300", "idle_timeout"),
        ("idle 2000.0s >= release_timeout_s 1800", "release_timeout"),
        ("making room for 'b' (request 1, priority 0)", "make_room"),
        ("admin request", "admin"),
        ("something new", "other"),
    ],
)
def test_reason_categories_are_few(reason: str, category: str) -> None:
    assert reason_category(reason) == category


def test_humanise_bytes() -> None:
    assert humanise_bytes(90 * 2**20) == "90 MiB" and humanise_bytes(3 * 2**30 // 2) == "1.5 GiB"
    assert humanise_bytes(None) == "0 B" and humanise_bytes(512) == "512 B"
