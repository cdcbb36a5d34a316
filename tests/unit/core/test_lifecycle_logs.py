"""Every move logs a pair of INFO lines: where and how much before, how long after."""

from __future__ import annotations

import logging

import pytest

from serve_app.core.lifecycle import Lifecycle
from tests.unit.core.test_lifecycle import FakeAdapter, FakeClock, MiB


async def test_moves_log_in_pairs(caplog: pytest.LogCaptureFixture) -> None:
    lc = Lifecycle(
        "x", FakeAdapter(90 * MiB), "cpu", clock=FakeClock(), location="GPU-1234", need_bytes=lambda: 90 * MiB
    )
    logger = logging.getLogger("serve_app")
    old, logger.propagate = logger.propagate, True
    try:
        with caplog.at_level(logging.INFO, logger="serve_app.core.lifecycle"):
            await lc.load()
            await lc.offload("idle")
            await lc.load()
            await lc.release("admin request")
    finally:
        logger.propagate = old
    lines = [r.getMessage() for r in caplog.records if r.name == "serve_app.core.lifecycle"]
    assert lines[0] == "Loading model 'x' on GPU-1234 (needs 90 MiB)."
    assert lines[1].startswith("Loaded model 'x' in ") and lines[1].endswith(" ms.")
    assert lines[2] == "Offloading model 'x' to CPU (idle)." and lines[3].startswith("Offloaded model 'x' to CPU in ")
    assert lines[4] == "Restoring model 'x' on GPU-1234 (needs 90 MiB)."
    assert lines[5].startswith("Restored model 'x' in ")
    assert lines[6] == "Releasing model 'x' (admin request)." and lines[7].startswith("Released model 'x' in ")
    assert len(lines) == 8


async def test_an_unknown_size_says_so(caplog: pytest.LogCaptureFixture) -> None:
    lc = Lifecycle("y", FakeAdapter(), "cpu", clock=FakeClock(), need_bytes=lambda: None)
    logger = logging.getLogger("serve_app")
    old, logger.propagate = logger.propagate, True
    try:
        with caplog.at_level(logging.INFO, logger="serve_app.core.lifecycle"):
            await lc.load()
    finally:
        logger.propagate = old
    assert caplog.records[0].getMessage() == "Loading model 'y' on cpu (needs size unknown until loaded)."
