"""The CPU tier's default budget follows the container's memory limit, not the machine's RAM."""

from __future__ import annotations

from pathlib import Path

import pytest

from serve_app.cluster import hostmem

GiB = 1024**3


def test_cgroup_v2_limit_is_read(tmp_path: Path) -> None:
    (tmp_path / "memory.max").write_text(f"{24 * GiB}\n")
    assert hostmem.cgroup_limit_bytes(tmp_path) == 24 * GiB


def test_cgroup_v2_max_means_no_limit(tmp_path: Path) -> None:
    (tmp_path / "memory.max").write_text("max\n")
    assert hostmem.cgroup_limit_bytes(tmp_path) is None


def test_cgroup_v1_limit_and_its_unlimited_value(tmp_path: Path) -> None:
    (tmp_path / "memory").mkdir()
    limit = tmp_path / "memory" / "memory.limit_in_bytes"
    limit.write_text(f"{8 * GiB}\n")
    assert hostmem.cgroup_limit_bytes(tmp_path) == 8 * GiB
    limit.write_text("9223372036854771712\n")  # what cgroup v1 writes when nothing is set
    assert hostmem.cgroup_limit_bytes(tmp_path) is None


def test_no_cgroup_files_means_no_limit(tmp_path: Path) -> None:
    assert hostmem.cgroup_limit_bytes(tmp_path) is None


def test_usable_is_the_smaller_of_ram_and_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hostmem, "physical_bytes", lambda: 256 * GiB)
    (tmp_path / "memory.max").write_text(f"{24 * GiB}\n")
    assert hostmem.usable_bytes(tmp_path) == 24 * GiB
    (tmp_path / "memory.max").write_text(f"{512 * GiB}\n")
    assert hostmem.usable_bytes(tmp_path) == 256 * GiB
    (tmp_path / "memory.max").write_text("max\n")
    assert hostmem.usable_bytes(tmp_path) == 256 * GiB


def test_budget_is_the_configured_value_else_half() -> None:
    assert hostmem.host_budget_bytes(None, 24 * GiB) == 12 * GiB
    assert hostmem.host_budget_bytes(5 * GiB, 24 * GiB) == 5 * GiB
    assert hostmem.host_budget_bytes(0, 24 * GiB) == 0


def test_the_probe_uses_the_container_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    from serve_app.cluster.probe_actor import NodeProbe
    from serve_app.config import parse_app_config

    probe = NodeProbe.__new__(NodeProbe)  # no Ray: only the budget is under test
    probe.config = parse_app_config({"models": [{"id": "m", "family": "faster-whisper", "source": "package:x"}]})
    monkeypatch.setattr(hostmem, "usable_bytes", lambda: 10 * GiB)  # not this machine's RAM
    assert probe.host_budget_bytes() == 5 * GiB
