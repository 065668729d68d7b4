"""Totals never go back across `systemctl restart` with workers (issue 19, bug 3), in a
real systemd 252: the restart hands over through the fd store to a new supervisor, whose
/metrics must serve the whole sums from its first scrape, before its workers report."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from typing import Any

import pytest
from nspawn import Container
from prometheus_client.parser import text_string_to_metric_families
from test_service import HOST, PORT, WAIT_S, events, main_pid
from test_service import c as c  # the reset container (fixture)
from test_service import cursor as cursor  # a journal cursor (fixture)

from tests.traffic import connect, recv_until_eof, roundtrip

pytestmark = pytest.mark.system

METRICS_PORT = 9707
CONFIG = (
    f'listen:\n  - "{HOST}:{PORT}"\nworkers: 2\nshutdown_timeout: 5s\n'
    f'metrics:\n  listen: "{HOST}:{METRICS_PORT}"\n'
)
AFTER_COMPLETE_S = 2.0  # scrape on past the new workers' first heartbeats

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape() -> Samples | None:
    """One scrape, or None if the restart closed it (a scrape in progress is left behind)."""
    conn = http.client.HTTPConnection(HOST, METRICS_PORT, timeout=WAIT_S)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        body = response.read().decode()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()
    assert response.status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def lower(before: Samples, after: Samples) -> dict[str, Any]:
    """epolld's totals (every *_total, the histogram's parts) that after shows lower. The
    process_* series are the process's own, and a restart under systemd is a new one."""
    return {
        f"{name}{dict(labels)}": (value, after.get((name, labels)))
        for (name, labels), value in before.items()
        if name.startswith("epolld_")
        and (name.endswith("_total") or name.startswith("epolld_connection_duration_seconds_"))
        and value > after.get((name, labels), -1.0)
    }


def test_restart_with_workers_never_serves_lower_totals(c: Container, cursor: str) -> None:
    """/metrics scraped in a tight loop through `systemctl restart` with workers: 2 never
    shows a total lower than an earlier scrape did."""
    c.write_file("/etc/epolld.yaml", CONFIG)
    c.systemctl("start", "epolld")
    pid = main_pid(c)
    socks = [connect(PORT, HOST) for _ in range(10)]
    try:
        for sock in socks:
            roundtrip(sock, b"0123456789")
        for sock in socks[5:]:
            sock.shutdown(socket.SHUT_WR)
            assert recv_until_eof(sock) == b""
        deadline = time.monotonic() + WAIT_S
        while (first := scrape()) is None or first.get(
            ("epolld_connections_closed_total", (("reason", "eof"),))
        ) != 5:
            assert time.monotonic() < deadline, first
            time.sleep(0.1)
        restart = threading.Thread(target=c.systemctl, args=("restart", "epolld"), daemon=True)
        seen = [first]
        complete_at = None
        checked_at = 0.0
        restart.start()
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            samples = scrape()
            if samples is not None:
                assert lower(seen[-1], samples) == {}, f"scrape {len(seen)}"
                seen.append(samples)
            now = time.monotonic()
            if complete_at is None and now - checked_at > 0.5:  # journalctl is slow
                checked_at = now
                if any(
                    e["event"] == "handoff_complete" and "worker" not in e
                    for e in events(c, cursor)
                ):
                    complete_at = now
            if complete_at is not None and now - complete_at > AFTER_COMPLETE_S:
                break
        restart.join(WAIT_S)
        assert complete_at is not None, "no handoff_complete from the new supervisor"
        assert main_pid(c) != pid
        assert seen[-1][("epolld_connections_accepted_total", ())] == 10
    finally:
        for sock in socks:
            sock.close()
