"""Expected reload cost and the eviction rule built on it (`serve_app/core/cost.py`, `policy.py`)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from serve_app.core.cost import DecayedRate, effective_rate_hz, eviction_cost_s, guess_load_s, guess_restore_s
from serve_app.core.policy import decide, eviction_order
from serve_app.core.snapshot import Offload, PolicyLimits, Release
from serve_app.core.states import ModelState
from tests.unit.core.test_policy import NO_MARGIN, GiB, inst, offloaded, released, req, world

S = ModelState


def test_decayed_rate_adds_one_over_tau_and_decays_with_tau() -> None:
    rate = DecayedRate(tau_s=100.0)
    assert rate.rate("a", 0.0) == 0.0
    rate.observe("a", 0.0)
    rate.observe("a", 0.0)
    assert rate.rate("a", 0.0) == pytest.approx(0.02)
    assert rate.rate("a", 100.0) == pytest.approx(0.02 / math.e)
    # An arrival reported late (older than the last) does not rewind the clock.
    rate.observe("a", 50.0)
    rate.observe("a", 10.0)
    assert rate.rates(50.0)["a"] == pytest.approx(0.02 * math.exp(-0.5) + 0.02)


def test_eviction_cost_saturates_at_the_reload_seconds() -> None:
    assert eviction_cost_s(0.0, 10.0) == 0.0
    assert eviction_cost_s(1.0, 10.0, horizon_s=60.0) == pytest.approx(10.0)
    low = eviction_cost_s(0.001, 10.0, horizon_s=60.0)
    assert low == pytest.approx(10.0 * (1 - math.exp(-0.06)))
    assert guess_load_s(GiB) == pytest.approx(3.0) and guess_restore_s(10 * GiB) == pytest.approx(1.05)


def test_the_rate_is_capped_by_one_over_idle() -> None:
    assert effective_rate_hz(0.5, 10.0) == pytest.approx(0.1)
    assert effective_rate_hz(0.01, 10.0) == pytest.approx(0.01)
    assert effective_rate_hz(0.5, 0.0) == 0.5


def test_cost_ordering_evicts_the_least_expected_reload_per_byte_first() -> None:
    """Hand-made: 'hot' is the least recently used but is asked every 10 s; 'cold' was used just
    now but is rarely asked; 'slow' is rare too but its cold load takes 60 s."""
    hot = replace(inst("hot", 4, last_used=90), request_rate_hz=0.1, load_s=5.0)
    cold = replace(inst("cold", 4, last_used=99), request_rate_hz=0.001, load_s=5.0)
    slow = replace(inst("slow", 4, last_used=95), request_rate_hz=0.001, load_s=60.0)
    snap = world([hot, cold, slow], [req("x", 4)], gpus={"g0": 12}, budget={"n0": 0})
    assert released(decide(snap, 100.0)) == ["cold"]  # LRU would have taken "hot"
    keys = sorted([hot, cold, slow], key=lambda i: eviction_order(i, NO_MARGIN, 0, 100.0))
    assert [i.model for i in keys] == ["cold", "slow", "hot"]


def test_cost_per_byte_prefers_one_large_cheap_model_to_a_small_costly_one() -> None:
    small = replace(inst("small", 2, last_used=0), request_rate_hz=0.01, load_s=4.0)
    large = replace(inst("large", 8, last_used=90), request_rate_hz=0.01, load_s=10.0)
    snap = world([small, large], [req("x", 6)], gpus={"g0": 10}, budget={"n0": 0})
    assert released(decide(snap, 100.0)) == ["large"]


def test_greedy_plan_drops_evictions_it_no_longer_needs() -> None:
    # Cheapest per byte first: "tiny" (1 GiB), then "big" (8 GiB); "big" alone frees enough.
    tiny = replace(inst("tiny", 1, last_used=0), request_rate_hz=0.0)
    big = replace(inst("big", 8, last_used=0), request_rate_hz=0.0001, load_s=1.0)
    keep = replace(inst("keep", 1, last_used=0), request_rate_hz=1.0, load_s=30.0)
    snap = world([tiny, big, keep], [req("x", 8)], gpus={"g0": 10}, budget={"n0": 0})
    assert released(decide(snap, 100.0)) == ["big"]


def test_priority_stays_a_hard_rule_whatever_the_cost() -> None:
    """A high-priority model nobody asks for is not evicted for a low-priority load, and among
    the allowed ones lower priority still goes first."""
    vip = replace(inst("vip", 4, priority=5, last_used=0), request_rate_hz=0.0)
    hot = replace(inst("hot", 4, priority=0, last_used=0), request_rate_hz=1.0, load_s=60.0)
    snap = world([vip, hot], [req("x", 4)], gpus={"g0": 8}, budget={"n0": 0})
    assert released(decide(snap, 100.0)) == ["hot"]
    snap = world([vip], [req("x", 4)], gpus={"g0": 4}, budget={"n0": 0})
    assert released(decide(snap, 100.0)) == [] and offloaded(decide(snap, 100.0)) == []


@pytest.mark.parametrize("kind", ["busy", "pinned", "pending"])
def test_nothing_busy_pinned_or_pending_moves_however_cheap(kind: str) -> None:
    cheap = replace(
        inst("cheap", 4, in_flight=int(kind == "busy"), pinned=kind == "pinned", idle=1.0, last_used=0),
        request_rate_hz=0.0,
    )
    dear = replace(inst("dear", 4, last_used=0), request_rate_hz=1.0, load_s=60.0)
    pending = [req("x", 4), *([req("cheap", 4)] if kind == "pending" else [])]
    snap = world([cheap, dear], pending, gpus={"g0": 8}, budget={"n0": 0})
    moved = {a.model for a in decide(snap, 100.0) if isinstance(a, Offload | Release)}
    assert "cheap" not in moved and moved == {"dear"}


def test_offload_versus_release_follows_the_expected_cost_against_the_host_budget() -> None:
    """The host budget is full with a rarely asked CPU copy: releasing that copy and offloading
    the victim is expected to cost less than releasing the victim (which reloads cold)."""
    victim = replace(inst("victim", 4, last_used=0), request_rate_hz=0.05, load_s=20.0, restore_s=0.5)
    stale = replace(inst("stale", 4, state=S.CPU, last_used=0), request_rate_hz=0.0001, load_s=20.0)
    snap = world([victim, stale], [req("x", 4)], gpus={"g0": 4}, budget={"n0": 4})
    actions = decide(snap, 100.0)
    assert released(actions) == ["stale"] and offloaded(actions) == ["victim"]
    # With the CPU copy hotter than the victim, the victim is released instead.
    hot_copy = replace(stale, request_rate_hz=1.0)
    actions = decide(world([victim, hot_copy], [req("x", 4)], gpus={"g0": 4}, budget={"n0": 4}), 100.0)
    assert released(actions) == ["victim"] and offloaded(actions) == []


def test_an_expired_idle_timeout_waits_while_its_expected_reload_is_dear() -> None:
    """A model whose restore takes 30 s (pageable host copy) and was asked often: even capped at
    1/idle, its expected reload within the horizon is about 1 s, more than the 0.1 s allowed."""
    busy_lately = replace(inst("a", 4, idle=300.0, last_used=0), request_rate_hz=0.05, restore_s=30.0)
    lazy = PolicyLimits(margin_fraction=0.0, margin_bytes=0, timeout_max_cost_s=0.1)
    assert decide(world([busy_lately], limits=lazy), 300.0) == []
    quiet = replace(busy_lately, request_rate_hz=0.0001)
    assert offloaded(decide(world([quiet], limits=lazy), 300.0)) == ["a"]
    # By default (opt-in off) the timeout acts as configured.
    assert offloaded(decide(world([busy_lately]), 300.0)) == ["a"]
