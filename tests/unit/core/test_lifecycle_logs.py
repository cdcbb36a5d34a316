"""Every move logs a pair of INFO lines: where and how much before, how long after."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from serve_app.core.lifecycle import Lifecycle
from tests.unit.core.test_lifecycle import FakeAdapter, FakeClock, MiB


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def lines() -> Iterator[list[str]]:
    """The lifecycle logger's lines, from a handler of its own (independent of other tests' logging setup)."""
    logger = logging.getLogger("serve_app.core.lifecycle")
    handler, old_level = Lines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.lines
    logger.removeHandler(handler)
    logger.setLevel(old_level)


async def test_moves_log_in_pairs(lines: list[str]) -> None:
    lc = Lifecycle(
        "x", FakeAdapter(90 * MiB), "cpu", clock=FakeClock(), location="GPU-1234", need_bytes=lambda: 90 * MiB
    )
    await lc.load()
    await lc.offload("idle")
    await lc.load()
    await lc.release("admin request")
    assert lines[0] == "Loading model 'x' on GPU-1234 (needs 90 MiB)."
    assert lines[1].startswith("Loaded model 'x' in ") and lines[1].endswith(" ms.")
    assert lines[2] == "Offloading model 'x' to CPU (idle)." and lines[3].startswith("Offloaded model 'x' to CPU in ")
    assert lines[4] == "Restoring model 'x' on GPU-1234 (needs 90 MiB)."
    assert lines[5].startswith("Restored model 'x' in ")
    assert lines[6] == "Releasing model 'x' (admin request)." and lines[7].startswith("Released model 'x' in ")
    assert len(lines) == 8


async def test_an_unknown_size_says_so(lines: list[str]) -> None:
    lc = Lifecycle("y", FakeAdapter(), "cpu", clock=FakeClock(), need_bytes=lambda: None)
    await lc.load()
    assert lines[0] == "Loading model 'y' on cpu (needs size unknown until loaded)."
