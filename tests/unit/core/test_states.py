"""The lifecycle table: every (state, new_state) pair is either in ALLOWED or raises."""

from __future__ import annotations

import itertools

import pytest

from serve_app.core.states import ALLOWED, IllegalTransition, ModelState, check_transition

S = ModelState
PAIRS = list(itertools.product(ModelState, repeat=2))


def test_state_values_are_what_the_admin_api_shows() -> None:
    assert [s.value for s in ModelState] == [
        "unloaded",
        "loading",
        "gpu",
        "offloading",
        "cpu",
        "restoring",
        "releasing",
    ]
    assert str(S.GPU) == "gpu"
    assert S("offloading") is S.OFFLOADING


def test_table_covers_every_state_and_names_only_states() -> None:
    assert set(ALLOWED) == set(ModelState)
    for targets in ALLOWED.values():
        assert isinstance(targets, frozenset)
        assert targets <= set(ModelState)


@pytest.mark.parametrize(("current", "new"), PAIRS, ids=[f"{a.value}->{b.value}" for a, b in PAIRS])
def test_every_pair_follows_the_table(current: ModelState, new: ModelState) -> None:
    if new in ALLOWED[current]:
        check_transition(current, new)
        return
    with pytest.raises(IllegalTransition) as info:
        check_transition(current, new)
    assert info.value.current is current and info.value.new is new
    assert repr(current.value) in str(info.value) and repr(new.value) in str(info.value)


def test_the_documented_moves_are_exactly_the_allowed_ones() -> None:
    # Spelled out once more so an accidental edit of the table shows up as a diff here.
    expected = {
        (S.UNLOADED, S.LOADING),
        (S.LOADING, S.GPU),
        (S.LOADING, S.UNLOADED),  # a failed load returns to unloaded
        (S.GPU, S.OFFLOADING),
        (S.GPU, S.RELEASING),
        (S.OFFLOADING, S.CPU),
        (S.OFFLOADING, S.GPU),  # a failed offload stays on the GPU
        (S.CPU, S.RESTORING),
        (S.CPU, S.RELEASING),
        (S.RESTORING, S.GPU),
        (S.RESTORING, S.CPU),  # a failed restore keeps the CPU copy
        (S.RESTORING, S.UNLOADED),  # ... or drops it when the rollback fails too
        (S.RELEASING, S.UNLOADED),
    }
    assert {(a, b) for a, targets in ALLOWED.items() for b in targets} == expected
    assert all((s, s) not in expected for s in ModelState)


def test_expected_state_mismatch_is_named_in_the_message() -> None:
    err = IllegalTransition(S.CPU, S.OFFLOADING, expected=S.GPU)
    assert "expected state 'gpu' but found 'cpu'" in str(err)
    assert err.expected is S.GPU
