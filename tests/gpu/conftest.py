"""Fixtures of the GPU tier tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.gpu.tier import Loop


@pytest.fixture
def run() -> Iterator[Loop]:
    """One event loop per test, on which the adapter's moves run as the service runs them."""
    loop = Loop()
    yield loop
    loop.close()
