"""The metrics endpoint through `epolld --daemon` and at start-up: bound before detaching."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.test_daemon_mode import (  # the helpers of the daemon mode tests
    Daemons,
    _epolld_settings,
    _is_gone,
    _logged,
    _wait_for,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def detached(tmp_path: Path) -> Iterator[Daemons]:
    """Daemons started here; any left running is killed by PID at teardown."""
    started = Daemons(tmp_path)
    yield started
    started.kill_all()


def test_daemon_mode_serves_metrics(detached: Daemons, tmp_path: Path) -> None:
    """The metrics socket survives daemonizing (python-daemon closes what is not kept)."""
    settings = {**_epolld_settings(tmp_path), "metrics": {"listen": "127.0.0.1:0"}}
    result = detached.start_epolld(settings)
    assert result.returncode == 0, result.stderr
    log = tmp_path / "epolld.log"
    address = _logged(log, "metrics_listening")[0]["address"]
    conn = http.client.HTTPConnection("127.0.0.1", int(address.rsplit(":", 1)[1]), timeout=10)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        assert response.status == 200
        assert b"epolld_connections 0.0" in response.read()
    finally:
        conn.close()
    pid = detached.pids[0]
    os.kill(pid, signal.SIGTERM)
    _wait_for("the daemon to exit", lambda: _is_gone(pid))


def test_busy_metrics_address_fails_start_with_69(tmp_path: Path) -> None:
    """A metrics address that cannot be bound stops the start with exit 69, naming it."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "epolld.yaml"
        config.write_text(
            yaml.safe_dump({"listen": ["127.0.0.1:0"], "metrics": {"listen": f"127.0.0.1:{port}"}})
        )
        result = subprocess.run(
            [sys.executable, "-m", "epolld", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert result.returncode == 69
    assert result.stderr.startswith(
        f"Error: metrics.listen: cannot listen on 127.0.0.1:{port}: address already in use"
    )
