"""A real Prometheus (Debian 12's 2.42) scrapes the daemon every second; checked via its API.

Root only: the harness installs Debian's prometheus package when it is missing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import prometheus_process
from tests.conftest import StartDaemon
from tests.prometheus_process import Prometheus
from tests.traffic import connect, roundtrip

pytestmark = pytest.mark.slow

CLIENTS = 5


@pytest.fixture
def mode() -> dict[str, Any]:
    """What is scraped does not depend on the echo mode: one mode is enough."""
    return {}


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[type[Prometheus]]:
    why_not = prometheus_process.ensure_installed()
    if why_not:
        pytest.skip(why_not)
    started: list[Prometheus] = []

    class Started(Prometheus):
        def __init__(self, tmp: Path, targets: list[str]) -> None:
            super().__init__(tmp, targets)
            started.append(self)

    yield Started
    for server in started:
        server.stop()


def test_prometheus_sees_open_clients_and_bytes(
    start_daemon: StartDaemon, prometheus_factory: type[Prometheus], tmp_path: Path
) -> None:
    """Through Prometheus' API: epolld_connections equals the clients held open, and the
    byte counters equal what the clients sent (and got back)."""
    daemon = start_daemon({"metrics": {"listen": "127.0.0.1:0"}})
    target = daemon.wait_for("metrics_listening")[0]["address"]
    prometheus = prometheus_factory(tmp_path / "prometheus", [target])
    prometheus.wait_for_value(f'up{{instance="{target}"}}', 1)
    sent = 0
    with contextlib.ExitStack() as stack:
        clients = [stack.enter_context(connect(daemon.port)) for _ in range(CLIENTS)]
        for index, sock in enumerate(clients):
            payload = bytes([65 + index]) * (1000 * (index + 1))
            roundtrip(sock, payload)
            sent += len(payload)
        prometheus.wait_for_value("epolld_connections", CLIENTS)
        prometheus.wait_for_value("epolld_received_bytes_total", sent)
        prometheus.wait_for_value("epolld_sent_bytes_total", sent)
        for sock in clients[:2]:
            sock.close()
        prometheus.wait_for_value("epolld_connections", CLIENTS - 2)
    prometheus.wait_for_value("epolld_connections", 0)
    prometheus.wait_for_value("epolld_connections_accepted_total", CLIENTS)
    prometheus.wait_for_value('sum(epolld_connections_closed_total{reason="eof"})', CLIENTS)
    prometheus.wait_for_value("epolld_connection_duration_seconds_count", CLIENTS)
    assert prometheus.value(f'epolld_build_info{{instance="{target}"}}') == 1
    assert (prometheus.value("process_resident_memory_bytes") or 0) > 0
    # Every scrape succeeded: no sample failed to parse, none was out of order.
    [active] = prometheus.api("targets")["activeTargets"]
    assert active["health"] == "up"
    assert active["lastError"] == ""
