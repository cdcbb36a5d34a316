"""The launcher starts local clusters with the Ray dashboard on loopback only."""

from __future__ import annotations

from serve_app.__main__ import local_ray_options


def test_the_dashboard_listens_on_loopback() -> None:
    options = local_ray_options()
    assert options["include_dashboard"] is True
    assert options["dashboard_host"] == "127.0.0.1"
