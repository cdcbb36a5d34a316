"""Progress estimates for a load or restore in flight."""

from __future__ import annotations

from typing import Any

from serve_app.core.progress import ASSUMED_READ_BYTES_PER_S, describe, estimate, measured_read_rate

MiB = 2**20


def row(model: str, state: str, **kw: Any) -> dict[str, Any]:
    return {"model": model, "state": state, "since_s": 0.0, "bytes_gpu": 0, "bytes_cpu": 0, **kw}


def test_not_moving_has_no_progress() -> None:
    assert estimate(row("a", "gpu"), []) is None
    assert estimate(row("a", "unloaded"), []) is None


def test_a_reload_is_expected_to_take_as_long_as_the_last_load() -> None:
    r = row("a", "loading", since_s=1.0, last_load_s=4.0)
    p = estimate(r, [r])
    assert p == {"kind": "load", "elapsed_s": 1.0, "expected_s": 4.0, "fraction": 0.25, "basis": "last load"}


def test_a_restore_uses_another_replicas_last_restore() -> None:
    other = row("a", "gpu", last_restore_s=0.5)
    r = row("a", "restoring", since_s=0.25)
    p = estimate(r, [other, r])
    assert p is not None and p["kind"] == "restore" and p["expected_s"] == 0.5 and p["fraction"] == 0.5


def test_a_first_load_is_estimated_from_bytes_and_the_measured_read_rate() -> None:
    loaded = row("b", "gpu", bytes_gpu=100 * MiB, last_load_s=0.5)  # 200 MiB/s measured
    r = row("a", "loading", since_s=1.0)
    p = estimate(r, [loaded, r], declared_bytes=400 * MiB)
    assert p is not None and p["expected_s"] == 2.0 and p["basis"] == "bytes at the measured read rate"
    assert measured_read_rate([loaded]) == 200 * MiB


def test_without_any_measurement_the_assumed_rate_is_used_and_the_fraction_stays_below_one() -> None:
    r = row("a", "loading", since_s=10.0)
    p = estimate(r, [r], declared_bytes=ASSUMED_READ_BYTES_PER_S)
    assert p is not None and p["expected_s"] == 1.0 and p["fraction"] == 0.99
    assert "assumed" in p["basis"]
    unknown = estimate(r, [r])
    assert unknown is not None and unknown["fraction"] is None and unknown["basis"] == "no size known"


def test_describe_speaks_like_a_progress_line() -> None:
    p = {"kind": "load", "elapsed_s": 12.0, "expected_s": 30.0}
    assert describe("x", p, "GPU-0", None) == "loading 'x' on GPU-0, 12.0 of ~30 s"
    assert describe("x", None, None, {"waiting_s": 2, "reason": "no room"}).startswith("waiting for GPU room")
    assert describe("x", None, None, None) == "waiting for 'x' to start"
