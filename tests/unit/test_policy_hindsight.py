"""`bench/policy_sim.py`'s hindsight references (``gpu-serve@knows=...``): what each is told, and
that knowing more of the future never costs the same `decide()` misses on a trace built for it."""

from __future__ import annotations

import pytest

from bench.policy_seeds import sums_table
from bench.policy_sim import HINDSIGHT, GpuServe, Sim, Spec, hindsight_next_use, simulate

GB = 10**9

# One model: a session at 0, 10, 20 s, a silence, another session at 1000 and 1010 s.
SPECS = {"a": Spec("a", 2 * GB, 5.0, 0.05)}
TRACE = [(t, "a", 2 * GB, 1.0) for t in (0.0, 10.0, 20.0, 1000.0, 1010.0)]


def seen_until(now: float) -> Sim:
    """A simulator whose gap history has seen the trace's arrivals up to `now`."""
    sim = Sim(SPECS, TRACE, (1, 48.0), 0.0)
    for t, m, _, _ in TRACE:
        if t <= now:
            sim.gaps.observe(m, t)
    return sim


def test_inside_a_session_each_reference_is_told_its_own_part() -> None:
    sim = seen_until(12.0)  # last request at 10 s; the next, at 20 s, goes on with the session
    online = sim.gaps.next_use_at("a", 12.0)
    assert hindsight_next_use(sim, "a", 12.0, "next-use") == 20.0
    # The session goes on: expected its mean in-session gap (10 s, from the history) from now.
    assert hindsight_next_use(sim, "a", 12.0, "session-end") == pytest.approx(22.0)
    # Not a new session: the online estimate, as gpu-serve has it.
    assert hindsight_next_use(sim, "a", 12.0, "next-session") == online


def test_after_a_session_only_next_session_and_next_use_know_when() -> None:
    sim = seen_until(25.0)  # last request at 20 s; the next, at 1000 s, starts a new session
    assert hindsight_next_use(sim, "a", 25.0, "next-use") == 1000.0
    assert hindsight_next_use(sim, "a", 25.0, "next-session") == 1000.0
    # Told the session ended but not when the next starts: with no silence in its history yet, the
    # residual of a silence longer than any seen (its age, 5 s) from now.
    assert hindsight_next_use(sim, "a", 25.0, "session-end") == pytest.approx(30.0)


def test_never_seen_is_unknown_to_every_reference() -> None:
    sim = seen_until(-1.0)
    assert all(hindsight_next_use(sim, "a", 0.0, k) is None for k in HINDSIGHT)


def test_an_unknown_reference_says_which_exist() -> None:
    with pytest.raises(ValueError, match="session-end, next-session, next-use"):
        GpuServe((None, None), knows="tomorrow")
    with pytest.raises(ValueError, match="next-use"):
        hindsight_next_use(seen_until(12.0), "a", 12.0, "tomorrow")


def test_the_references_run_beside_gpu_serve_and_the_table_sums_them() -> None:
    # Three models that cannot all fit on a 10 GiB GPU, asked for in sessions with silences.
    specs = {m: Spec(m, 4 * GB, 8.0, 0.1) for m in "abc"}
    trace = []
    for i, m in enumerate("abcacbabcbca"):
        start = 300.0 * i
        trace += [(start + 5.0 * k, m, 4 * GB, 1.0) for k in range(4)]
    results = simulate(specs, trace, (1, 10.0), 0.0, "none", loads=(1,), hindsight=True)
    names = [f"gpu-serve@knows={k}" for k in HINDSIGHT]
    assert all(n in results for n in names)
    assert all(results[n]["overcommits"] == 0 for n in names)
    # Told every next use, the same decide() needs no more loads than Belady-Size's, and fewer than
    # online (the sessions' order is not in any model's own history: 10 loads online, 6 told).
    told = results["gpu-serve@knows=next-use"]["cold_loads"]
    assert told <= results["belady-size"]["cold_loads"]
    assert told < results["gpu-serve"]["cold_loads"]
    scenario = "1x48, no CPU tier"
    table = sums_table(scenario, [1], {(1, scenario): results})
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()[2:]}
    assert set(rows) == {"gpu-serve", *names, "belady-size"}
    belady = results["belady-size"]["cold_loads"]
    assert f"| {results['gpu-serve']['cold_loads']:.0f} | {results['gpu-serve']['cold_loads'] / belady:.3f}x |" in rows[
        "gpu-serve"
    ]
