"""Signals: graceful stop with data in flight, forced stop, statistics, reload, tracing."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest

from tests.conftest import StartDaemon
from tests.traffic import connect, recv_exactly, recv_until_eof, roundtrip

pytestmark = pytest.mark.slow


def test_sigterm_echoes_everything_received_then_fin(start_daemon: StartDaemon) -> None:
    """On SIGTERM every byte the daemon received is echoed, each peer gets a FIN (not a
    reset), and the daemon exits 0."""
    daemon = start_daemon({"shutdown_timeout": "10s"})
    data = os.urandom(32 << 20)
    busy = connect(daemon.port)
    quiet = connect(daemon.port)
    roundtrip(quiet, b"before the stop")
    received = bytearray()

    def writer() -> None:
        try:
            busy.sendall(data)
            busy.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # after our FIN the daemon discards input; a reset here would fail below

    thread = threading.Thread(target=writer)
    thread.start()
    received += recv_exactly(busy, 1 << 20)  # data is in flight in both directions
    daemon.signal(signal.SIGTERM)
    received += recv_until_eof(busy)  # raises ConnectionResetError on a reset
    thread.join(30)
    assert recv_until_eof(quiet) == b""  # the idle peer gets a FIN too
    quiet.close()
    busy.close()
    assert daemon.wait() == 0
    assert bytes(received) == data[: len(received)]
    closed = {e["peer"]: e for e in daemon.events("connection_closed")}
    busy_log = closed[f"127.0.0.1:{busy_port(daemon, closed)}"]
    assert busy_log["bytes_in"] == busy_log["bytes_out"] == len(received)
    daemon.wait_for("shutdown_complete")


def busy_port(daemon, closed) -> int:  # type: ignore[no-untyped-def]
    """The peer port of the connection that moved the most bytes."""
    peer = max(closed.values(), key=lambda e: e["bytes_in"])["peer"]
    return int(peer.rsplit(":", 1)[1])


def test_shutdown_timeout_forces_close(start_daemon: StartDaemon) -> None:
    """A peer that never closes is cut off at shutdown_timeout, and the exit is still 0."""
    daemon = start_daemon({"shutdown_timeout": "500ms"})
    with connect(daemon.port) as stubborn:
        roundtrip(stubborn, b"I will not leave")
        daemon.signal(signal.SIGTERM)
        assert recv_until_eof(stubborn) == b""  # our FIN; we keep our side open
        assert daemon.wait() == 0
    daemon.wait_for("shutdown_forced")


def test_second_sigint_stops_at_once(start_daemon: StartDaemon) -> None:
    """A second Ctrl-C ends the drain immediately."""
    daemon = start_daemon({"shutdown_timeout": "60s"})
    with connect(daemon.port) as stubborn:
        roundtrip(stubborn, b"hold on")
        daemon.signal(signal.SIGINT)
        daemon.wait_for("shutdown_started")
        daemon.signal(signal.SIGINT)
        assert daemon.wait(timeout=5) == 0
    daemon.wait_for("shutdown_forced", signal="SIGINT")


def test_sigusr1_logs_statistics(start_daemon: StartDaemon) -> None:
    """SIGUSR1 writes one stats line with live counters."""
    daemon = start_daemon()
    with connect(daemon.port) as sock:
        roundtrip(sock, b"x" * 1000)
        daemon.signal(signal.SIGUSR1)
        [stats] = daemon.wait_for("stats")
    assert stats["connections"] == 1
    assert stats["accepted"] == 1
    assert stats["bytes_in"] == stats["bytes_out"] == 1000
    # The loop's longest turn so far, in ms: a few ms at most for one round trip.
    assert 0 <= stats["longest_turn_ms"] < 1000
    assert 0 <= stats["longest_deferred_cpu_ms"] <= stats["longest_turn_ms"] + 1
    assert stats["slow_turns"] >= 0  # turns of over 100 ms (test_loop counts them)


def test_sighup_applies_new_listener_and_keeps_connections(
    start_daemon: StartDaemon, tmp_path: os.PathLike[str]
) -> None:
    """SIGHUP re-reads the file: a new address serves, an old connection keeps echoing."""
    path = f"{tmp_path}/added.sock"
    daemon = start_daemon()
    with connect(daemon.port) as before:
        roundtrip(before, b"before")
        config = daemon.config_path.read_text()
        daemon.config_path.write_text(config.replace("listen:\n", f"listen:\n- unix:{path}\n"))
        daemon.signal(signal.SIGHUP)
        daemon.wait_for("config_reloaded")
        with socket.socket(socket.AF_UNIX) as added:
            added.connect(path)
            roundtrip(added, b"new listener")
        roundtrip(before, b"after")


def test_sighup_with_broken_file_keeps_running(start_daemon: StartDaemon) -> None:
    """A reload of an invalid file logs the error with its line and changes nothing."""
    daemon = start_daemon()
    daemon.config_path.write_text(
        daemon.config_path.read_text() + "limits: {max_connections: many}\n"
    )
    daemon.signal(signal.SIGHUP)
    [failed] = daemon.wait_for("config_reload_failed")
    assert str(daemon.config_path) in failed["error"]
    assert "max_connections" in failed["error"]
    with connect(daemon.port) as sock:
        roundtrip(sock, b"still serving")


def test_trace_level_logs_decoded_epoll_events(start_daemon: StartDaemon) -> None:
    """At level trace each epoll event is logged with its decoded mask."""
    daemon = start_daemon({"logging": {"level": "trace"}})
    with connect(daemon.port) as sock:
        roundtrip(sock, b"traced")
        # Edge mode reads until EAGAIN: a FIN sent at once can be read within the same
        # event. Let that event end, so the FIN raises an edge (EPOLLRDHUP) of its own.
        time.sleep(0.2)
        sock.shutdown(socket.SHUT_WR)
        recv_until_eof(sock)
    traced = daemon.wait_for("epoll_event", count=2)
    # The peer's FIN was traced before the daemon closed, but the log reader may lag.
    deadline = time.monotonic() + 10
    while True:
        masks = {e["events"] for e in daemon.events("epoll_event")}
        if any(m.startswith("EPOLLIN") and m.endswith("EPOLLRDHUP") for m in masks):
            break
        assert time.monotonic() < deadline, masks
        time.sleep(0.05)
    assert all(isinstance(e["fd"], int) for e in traced)
