"""workers: N > 1 on the other paths: the metrics endpoint (totals) and daemon mode."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.test_daemon_mode import Daemons, _is_gone, _listening_port, _logged, _wait_for
from tests.test_daemon_mode import daemons as daemons
from tests.test_metrics_endpoint import get, metrics_port, rewrite, scrape
from tests.test_workers import start_workers as start_workers
from tests.traffic import connect, echo_until_eof, recv_until_eof, roundtrip

WAIT_S = 15.0


def _scrape_until(
    port: int, name: str, value: float, host: str = "127.0.0.1"
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples once name (no labels) reads value: the workers report once a heartbeat."""
    deadline = time.monotonic() + WAIT_S
    while (samples := scrape(port, host))[(name, ())] != value:
        assert time.monotonic() < deadline, samples[(name, ())]
        time.sleep(0.1)
    return samples


def test_metrics_endpoint_shows_totals_over_workers(start_workers: Any) -> None:
    """The supervisor serves /metrics, and its numbers are the sums over every worker."""
    w = start_workers(2, {"metrics": {"listen": "127.0.0.1:0"}})
    assert "worker" not in w.daemon.wait_for("metrics_listening")[0]
    port = metrics_port(w.daemon)
    socks = [connect(w.daemon.port) for _ in range(20)]
    try:
        for sock in socks:
            roundtrip(sock, b"0123456789")
        assert {w.worker_of(s) for s in socks} == {1, 2}
        samples = _scrape_until(port, "epolld_connections", 20)
        assert samples[("epolld_connections_accepted_total", ())] == 20
        assert samples[("epolld_received_bytes_total", ())] == 200
        assert samples[("epolld_sent_bytes_total", ())] == 200
    finally:
        for sock in socks:
            sock.close()


def test_metrics_listener_and_totals_survive_the_handoff(start_workers: Any) -> None:
    """SIGUSR2 with workers: the metrics socket travels with the supervisor (same port,
    never closed), and the totals carry on from where the old workers left them."""
    w = start_workers(2, {"metrics": {"listen": "127.0.0.1:0"}})
    port = metrics_port(w.daemon)
    socks = [connect(w.daemon.port) for _ in range(20)]
    try:
        for sock in socks:
            roundtrip(sock, b"0123456789")
        _scrape_until(port, "epolld_sent_bytes_total", 200)
        w.daemon.signal(signal.SIGUSR2)
        no_worker: dict[str, Any] = {"worker": None}
        w.daemon.wait_for("handoff_complete", **no_worker)
        assert metrics_port(w.daemon, count=2) == port
        for sock in socks:
            roundtrip(sock, b"abcdefghij")
        samples = _scrape_until(port, "epolld_sent_bytes_total", 400)
        assert samples[("epolld_connections", ())] == 20
        assert samples[("epolld_connections_accepted_total", ())] == 20
    finally:
        for sock in socks:
            sock.close()


def test_moved_metrics_listener_applies_at_the_handoff(start_workers: Any) -> None:
    """metrics.listen changed in the file before SIGUSR2: the next supervisor closes the
    handed-over metrics socket and serves the totals on the new address."""
    w = start_workers(2, {"metrics": {"listen": "127.0.0.1:0"}})
    old_port = metrics_port(w.daemon)
    sock = connect(w.daemon.port)
    try:
        roundtrip(sock, b"0123456789")
        rewrite(w.daemon, metrics={"listen": "127.0.0.2:0"})
        w.daemon.signal(signal.SIGUSR2)
        no_worker: dict[str, Any] = {"worker": None}
        w.daemon.wait_for("handoff_complete", **no_worker)
        closed = w.daemon.wait_for("metrics_closed", **no_worker)[0]
        assert closed["address"] == f"127.0.0.1:{old_port}"
        moved = w.daemon.wait_for("metrics_listening", count=2)[-1]["address"]
        assert moved.startswith("127.0.0.2:")
        with pytest.raises(ConnectionRefusedError):
            get(old_port)
        roundtrip(sock, b"abcdefghij")  # the connection went on too
        _scrape_until(int(moved.rsplit(":", 1)[1]), "epolld_sent_bytes_total", 20, "127.0.0.2")
    finally:
        sock.close()


def test_daemon_mode_pidfile_holds_the_supervisor(daemons: Daemons, tmp_path: Path) -> None:
    """--daemon with workers: the pidfile names the supervisor, whose children are the
    workers; SIGTERM stops them all and removes the pidfile."""
    pidfile, log = tmp_path / "epolld.pid", tmp_path / "epolld.log"
    settings: dict[str, Any] = {
        "listen": ["127.0.0.1:0"],
        "workers": 2,
        "daemon": {"pidfile": str(pidfile), "log_file": str(log)},
    }
    result = daemons.start_epolld(settings)
    assert result.returncode == 0, result.stderr
    supervisor = daemons.pids[0]
    started = _logged(log, "worker_started", count=2)
    workers = [e["pid"] for e in started]
    daemons.pids += workers
    _logged(log, "workers_ready")
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    assert sorted(map(int, children)) == sorted(workers)
    assert _logged(log, "supervisor_started")[0].get("worker") is None
    assert echo_until_eof(_listening_port(log), b"daemon workers\n") == b"daemon workers\n"
    os.kill(supervisor, signal.SIGTERM)
    _wait_for("the supervisor and workers to exit", lambda: all(map(_is_gone, daemons.pids)))
    assert not pidfile.exists()
    assert len(_logged(log, "worker_exited", count=2)) == 2


def test_proxy_listener_with_workers(start_workers: Any) -> None:
    """A PROXY protocol listener works in every worker, and the supervisor's stats add up
    the workers' header errors."""
    w = start_workers(2, {"listen": [{"address": "127.0.0.1:0", "proxy_protocol": True}]})
    port = w.daemon.port
    workers = set()
    for _ in range(200):
        after = w.opened()
        with connect(port) as sock:
            local_port = sock.getsockname()[1]  # as the header's source: worker_of() finds it
            sock.sendall(b"PROXY TCP4 192.0.2.1 192.0.2.2 %d 7080\r\n" % local_port)
            roundtrip(sock, b"behind a proxy")
            workers.add(w.worker_of(sock, after))
        if workers == {1, 2}:
            break
    assert workers == {1, 2}
    for _ in range(20):
        with connect(port) as sock:
            sock.sendall(b"NOT A PROXY HEADER\r\n")
            with contextlib.suppress(ConnectionResetError):  # closed unread: RST or FIN
                assert sock.recv(100) == b""
    stats = w.stats()
    assert sum(stats["proxy_header_errors"].values()) == 20


def test_daemon_mode_handoff_keeps_supervisor_pid_and_pidfile(
    daemons: Daemons, tmp_path: Path
) -> None:
    """--daemon with workers: SIGUSR2 re-executes the supervisor in place (same PID in the
    pidfile, its lock still held), new workers take over the connections, and SIGTERM
    afterwards stops everything and removes the pidfile."""
    pidfile, log = tmp_path / "epolld.pid", tmp_path / "epolld.log"
    settings: dict[str, Any] = {
        "listen": ["127.0.0.1:0"],
        "workers": 2,
        "logging": {"connections": True},
        "daemon": {"pidfile": str(pidfile), "log_file": str(log)},
    }
    result = daemons.start_epolld(settings)
    assert result.returncode == 0, result.stderr
    supervisor = daemons.pids[0]
    daemons.pids += [e["pid"] for e in _logged(log, "worker_started", count=2)]
    _logged(log, "workers_ready")
    port = _listening_port(log)
    socks = [connect(port) for _ in range(20)]
    for sock in socks:
        roundtrip(sock, b"before")
    assert {e["worker"] for e in _logged(log, "connection_opened", count=20)} == {1, 2}
    os.kill(supervisor, signal.SIGUSR2)
    complete = [e for e in _logged(log, "handoff_complete", count=3) if "worker" not in e]
    assert complete[0]["connections"] == 20
    assert complete[0]["old_pid"] == supervisor
    daemons.pids += [e["pid"] for e in _logged(log, "worker_started", count=4)]
    for sock in socks:
        roundtrip(sock, b"after")
    assert int(pidfile.read_text()) == supervisor
    assert not _is_gone(supervisor)
    os.kill(supervisor, signal.SIGTERM)
    for sock in socks:  # drained: a FIN, not a reset
        assert recv_until_eof(sock) == b""
        sock.close()
    _wait_for("the supervisor and workers to exit", lambda: all(map(_is_gone, daemons.pids)))
    assert not pidfile.exists()
