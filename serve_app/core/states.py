"""Lifecycle states and the legal moves between them, as a table.

Split from `lifecycle.py` so the policy (which only reads states) imports no asyncio machinery.
"""

from __future__ import annotations

from enum import Enum


class ModelState(str, Enum):
    """Where a model instance's weights are. The values are what the admin API shows.

    `gpu` means "resident on the serving device": on a machine without CUDA the device is the
    CPU, and `offloading`/`restoring` keep the weights in place while still being recorded.
    """

    UNLOADED = "unloaded"
    LOADING = "loading"
    GPU = "gpu"
    OFFLOADING = "offloading"
    CPU = "cpu"
    RESTORING = "restoring"
    RELEASING = "releasing"

    def __str__(self) -> str:
        return self.value


S = ModelState

#: Legal transitions. A failed load returns to `unloaded`; a failed offload stays `gpu`;
#: a failed restore stays `cpu` when the CPU copy is intact, else `unloaded`.
ALLOWED: dict[ModelState, frozenset[ModelState]] = {
    S.UNLOADED: frozenset({S.LOADING}),
    S.LOADING: frozenset({S.GPU, S.UNLOADED}),
    S.GPU: frozenset({S.OFFLOADING, S.RELEASING}),
    S.OFFLOADING: frozenset({S.CPU, S.GPU}),
    S.CPU: frozenset({S.RESTORING, S.RELEASING}),
    S.RESTORING: frozenset({S.GPU, S.CPU, S.UNLOADED}),
    S.RELEASING: frozenset({S.UNLOADED}),
}

#: States in which the instance holds (or has been promised) GPU memory.
HOLDS_GPU: frozenset[ModelState] = frozenset({S.LOADING, S.GPU, S.OFFLOADING, S.RESTORING})
#: States in which the instance holds host RAM for the CPU tier.
HOLDS_CPU: frozenset[ModelState] = frozenset({S.CPU, S.RESTORING, S.OFFLOADING})


class IllegalTransition(RuntimeError):
    def __init__(self, current: ModelState, new: ModelState, expected: ModelState | None = None) -> None:
        if expected is not None and expected != current:
            msg = f"expected state {expected.value!r} but found {current.value!r} (moving to {new.value!r})"
        else:
            msg = f"illegal lifecycle transition {current.value!r} -> {new.value!r}"
        super().__init__(msg)
        self.current, self.new, self.expected = current, new, expected


def check_transition(current: ModelState, new: ModelState) -> None:
    if new not in ALLOWED[current]:
        raise IllegalTransition(current, new)
