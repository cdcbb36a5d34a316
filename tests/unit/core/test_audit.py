"""Belady-Size, its lower bound, and the trace ring the self-audit runs over."""

from __future__ import annotations

import csv
import io
import random

from serve_app.core.audit import audit, belady_lower_bound, belady_misses
from serve_app.core.trace import TRACE_HEADER, TraceRing

GB = 10**9


def test_belady_keeps_the_model_needed_soonest() -> None:
    # Room for two of three 1 GB models: a b c a b — on c, evict b? No: b is needed after a,
    # so the furthest next use is b's; Belady evicts b and misses a, b, c, then b again.
    reqs = [(0, "a", GB), (1, "b", GB), (2, "c", GB), (3, "a", GB), (4, "b", GB)]
    assert belady_misses(reqs, 2 * GB) == 4
    # LRU would evict a on c and miss a and b again: 5.
    assert belady_misses(reqs, 3 * GB) == 3
    assert belady_misses(reqs, 3 * GB, resident=["a", "b", "c"]) == 0


def test_a_model_larger_than_the_capacity_misses_every_time() -> None:
    reqs = [(0, "huge", 5 * GB), (1, "huge", 5 * GB), (2, "a", GB), (3, "a", GB)]
    assert belady_misses(reqs, 4 * GB) == 3


def test_lower_bound_never_exceeds_belady_and_counts_first_uses() -> None:
    rng = random.Random(3)
    sizes = {f"m{i}": rng.randint(1, 8) * GB for i in range(8)}
    for _ in range(20):
        t, reqs = 0.0, []
        for _ in range(300):
            t += rng.expovariate(1.0)
            m = rng.choice(list(sizes))
            reqs.append((t, m, sizes[m]))
        capacity = rng.randint(4, 30) * GB
        bound = belady_lower_bound(reqs, capacity)
        assert len({m for _, m, _ in reqs}) <= bound <= belady_misses(reqs, capacity)


def test_audit_ratio_and_its_edges() -> None:
    reqs = [(0, "a", GB), (1, "b", GB), (2, "a", GB)]
    doc = audit(reqs, gpu_misses=4, capacity_bytes=GB, window_s=60.0).as_dict()
    assert doc == {"window_s": 60.0, "gpu_misses": 4, "belady_misses": 3, "ratio": 1.333, "requests": 3}
    assert audit([], 0, GB, 60.0).as_dict()["ratio"] is None
    assert audit([], 2, GB, 60.0).as_dict()["ratio"] is None  # nothing to compare with


def test_ring_exports_the_simulator_csvs_and_fills_bytes_learned_later() -> None:
    ring = TraceRing(capacity=3)
    ring.add_request(100.0, "a", 0, 0.5)  # before a's first load: bytes unknown yet
    ring.add_move(100.0, "a", "load", 2.5, 2 * GB)
    ring.add_request(101.0, "b", GB, 0.25)
    ring.add_request(100.5, "a", 2 * GB, 0.1)  # reported late: kept in time order
    ring.add_request(103.0, "b", GB, 0.3)  # the ring holds 3: the oldest goes
    rows = list(csv.reader(io.StringIO(ring.requests_csv())))
    assert tuple(rows[0]) == TRACE_HEADER
    assert rows[1:] == [["0.000", "a", str(2 * GB), "0.100"], ["0.500", "b", str(GB), "0.250"],
                        ["2.500", "b", str(GB), "0.300"]]
    models = {r["model"]: r for r in csv.DictReader(io.StringIO(ring.models_csv()))}
    assert models["a"]["cold_load_s"] == "2.5000" and models["a"]["bytes"] == str(2 * GB)
    assert float(models["b"]["cold_load_s"]) > 2.0  # not measured: the policy's own guess


def test_ring_audit_counts_the_window_and_starts_belady_where_the_live_policy_was() -> None:
    ring = TraceRing(capacity=100)
    ring.add_move(0.0, "a", "load", 1.0, GB)
    ring.add_move(5.0, "b", "load", 1.0, GB)
    ring.add_move(6.0, "a", "offload", 0.1, GB)
    for t, m in [(20.0, "b"), (21.0, "a"), (22.0, "b"), (23.0, "a")]:
        ring.add_request(t, m, GB, 0.1)
    ring.add_move(21.0, "a", "restore", 0.1, GB)
    assert ring.resident_at(10.0) == ["b"]
    result = ring.audit(now=30.0, window_s=15.0, capacity_bytes=GB)
    # Window [15, 30]: live restored "a" once; Belady starts with "b" resident and room for one:
    # b hit, a miss (evict b), b miss, a miss.
    assert (result.gpu_misses, result.belady_misses, result.requests) == (1, 3, 4)
    assert result.window_s == 15.0
    assert TraceRing(0).requests_csv().strip() == ",".join(TRACE_HEADER)


def test_ring_audit_places_belady_on_the_gpus_the_replicas_were_given() -> None:
    """Two 1 GB models alternating: pooled (2 GB) Belady keeps both; on one 1 GB GPU each it does
    too; sharing one 1 GB GPU every switch misses."""
    ring = TraceRing(capacity=100)
    for i in range(6):
        ring.add_request(float(i), "a" if i % 2 == 0 else "b", GB, 0.1)
    assert ring.audit(10.0, 60.0, 2 * GB).belady_misses == 2
    assert ring.audit(10.0, 60.0, 2 * GB, groups=[(GB, {"a"}), (GB, {"b"})]).belady_misses == 2
    assert ring.audit(10.0, 60.0, 2 * GB, groups=[(GB, {"a", "b"})]).belady_misses == 6
