"""How far a load or restore in flight has come: elapsed against expected seconds.

The expectation comes from the model's own last measured move of the same kind (any replica
of it); for a first load, from its bytes over the disk read rate measured by the loads the
cluster has done (bytes / last_load_s), or an assumed rate until one has been measured.
Pure: it reads `/gpu/status` rows and returns plain data.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

#: Until a load has been measured: a conservative local-SSD/page-cache read rate.
ASSUMED_READ_BYTES_PER_S = 200 * 2**20
IN_FLIGHT = {"loading": "load", "restoring": "restore"}


def measured_read_rate(rows: Sequence[Mapping[str, Any]]) -> float | None:
    """Median bytes per second of the loads the status rows remember."""
    rates = []
    for r in rows:
        size = int(r.get("bytes_gpu") or 0) or int(r.get("bytes_cpu") or 0)
        t = r.get("last_load_s")
        if size and t:
            rates.append(size / float(t))
    return statistics.median(rates) if rates else None


def estimate(
    row: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], declared_bytes: int | None = None
) -> dict[str, Any] | None:
    """Progress of `row`'s move in flight, or None when it is not loading or restoring."""
    kind = IN_FLIGHT.get(str(row.get("state")))
    if kind is None:
        return None
    elapsed = float(row.get("since_s") or 0.0)
    same = [r for r in rows if r.get("model") == row.get("model")]
    key = f"last_{kind}_s"
    history = [float(r[key]) for r in [row, *same] if r.get(key)]
    if history:
        expected, basis = history[0], f"last {kind}"
    else:
        size = max([int(r.get("bytes_gpu") or 0) for r in same] + [int(r.get("bytes_cpu") or 0) for r in same])
        size = size or int(declared_bytes or 0)
        rate = measured_read_rate(rows)
        basis = "bytes at the measured read rate" if rate else "bytes at an assumed read rate"
        rate = rate or ASSUMED_READ_BYTES_PER_S
        expected = size / rate if size else 0.0
        if not size:
            basis = "no size known"
    fraction = min(0.99, elapsed / expected) if expected > 0 else None
    return {
        "kind": kind, "elapsed_s": round(elapsed, 3), "expected_s": round(expected, 3), "fraction": fraction,
        "basis": basis,
    }


def describe(model: str, progress: Mapping[str, Any] | None, gpu: str | None, waiting: Mapping[str, Any] | None) -> str:
    """The line a waiting streamed client sees: `loading 'x' on GPU-1, 12.0 of ~30 s`."""
    where = f" on {gpu}" if gpu else ""
    if progress is not None:
        verb = "loading" if progress["kind"] == "load" else "restoring"
        expected = progress.get("expected_s") or 0
        tail = f", {progress['elapsed_s']:.1f} of ~{expected:.0f} s" if expected else f", {progress['elapsed_s']:.1f} s"
        return f"{verb} {model!r}{where}{tail}"
    if waiting is not None:
        waited = float(waiting.get("waiting_s") or 0)
        return f"waiting for GPU room for {model!r}, {waited:.1f} s: {waiting.get('reason')}"
    return f"waiting for {model!r} to start"
