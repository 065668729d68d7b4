"""Limits the daemon enforces: connection counts, idle time, running out of descriptors."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import StartDaemon
from tests.epolld_process import Daemon, write_config
from tests.traffic import connect, connections, recv_until_eof, roundtrip

pytestmark = pytest.mark.slow


def assert_refused(port: int, source: str | None = None) -> None:
    """The daemon accepts and closes at once: EOF (or a reset) before any echo."""
    with connect(port, source=source) as sock:
        try:
            sock.sendall(b"anyone there?")
            assert recv_until_eof(sock, timeout=5) == b""
        except ConnectionResetError:
            pass


def test_max_connections(start_daemon: StartDaemon) -> None:
    """Beyond max_connections a new peer is closed at once, with one warning; a freed slot
    serves again."""
    daemon = start_daemon({"limits": {"max_connections": 5}})
    held = [connect(daemon.port) for _ in range(5)]
    try:
        for sock in held:
            roundtrip(sock, b"in")
        assert_refused(daemon.port)
        assert_refused(daemon.port)
        warnings = daemon.wait_for("connection_refused", limit="max_connections")
        held.pop().close()
        daemon.wait_for("connection_closed", reason="eof")
        with connect(daemon.port) as sock:
            roundtrip(sock, b"a slot is free")
        for sock in held:
            roundtrip(sock, b"still echoing")
    finally:
        for sock in held:
            sock.close()
    assert len(warnings) == 1  # rate-limited: two refusals, one warning
    assert [e["reason"] for e in daemon.events("connection_closed")][:3] == [
        "limit",
        "limit",
        "eof",
    ]


def test_max_connections_per_ip(start_daemon: StartDaemon) -> None:
    """A third connection from 127.0.0.1 is refused while 127.0.0.2 still gets in."""
    daemon = start_daemon({"listen": ["0.0.0.0:0"], "limits": {"max_connections_per_ip": 2}})
    held = [connect(daemon.port) for _ in range(2)]
    try:
        for sock in held:
            roundtrip(sock, b"in")
        assert_refused(daemon.port)
        with connect(daemon.port, source="127.0.0.2") as other:
            roundtrip(other, b"another address")
        daemon.wait_for("connection_refused", limit="max_connections_per_ip")
    finally:
        for sock in held:
            sock.close()


def test_idle_timeout_closes_silent_peers_only(start_daemon: StartDaemon) -> None:
    """A silent connection is closed after idle_timeout; one that keeps talking stays open."""
    daemon = start_daemon({"limits": {"idle_timeout": "400ms"}})
    with connect(daemon.port) as silent, connect(daemon.port) as chatty:
        roundtrip(silent, b"then silence")
        started = time.monotonic()
        while time.monotonic() - started < 1.5:  # well past the timeout, while talking
            roundtrip(chatty, b"tick")
            time.sleep(0.1)
        assert recv_until_eof(silent, timeout=5) == b""
        roundtrip(chatty, b"still here")
    closed = daemon.wait_for("connection_closed", reason="idle_timeout")
    assert len(closed) == 1


def test_emfile_pauses_accepting_without_spinning(
    start_daemon: StartDaemon, mode: dict[str, Any]
) -> None:
    """Out of descriptors, the daemon pauses accepting instead of spinning, logs it once, and
    serves again when clients leave; in splice mode clients beyond the pipe budget are served
    by copying."""
    daemon = start_daemon(nofile=24)  # stdio, epoll, wakeup pair, listener: ~15 for clients
    clients = [connect(daemon.port) for _ in range(40)]
    try:
        daemon.wait_for("accept_paused")
        cpu_before = daemon.cpu_seconds()
        time.sleep(2.0)
        cpu_used = daemon.cpu_seconds() - cpu_before
        served = clients[:3]  # accepted first (FIFO backlog), whatever fds each mode needs
        for sock in served:
            roundtrip(sock, b"accepted before the limit")
        paused_logs = len(daemon.events("accept_paused"))
    finally:
        for sock in clients:
            sock.close()
    assert cpu_used < 0.2, f"{cpu_used:.2f} s of CPU in 2 s while out of descriptors"
    daemon.wait_for("accept_resumed")
    with connect(daemon.port) as sock:
        roundtrip(sock, b"served again")
    assert paused_logs == 1  # once per episode, not once per retry
    if mode.get("io") == "splice":  # 24 fds cannot hold a pipe for any of 10,000 peers
        daemon.wait_for("splice_unavailable", reason="descriptor budget")
        assert {e["io"] for e in daemon.events("connection_opened")} == {"copy"}


@pytest.mark.parametrize("trigger", ["level", "edge"])
def test_splice_keeps_descriptors_for_every_connection(tmp_path: Path, trigger: str) -> None:
    """With io: splice near RLIMIT_NOFILE, pipes stop at a budget that leaves a descriptor for
    each of max_connections: every client is served (by copying past the budget), none
    waits in the backlog."""
    config = write_config(
        tmp_path / "epolld.yaml",
        {
            "listen": ["127.0.0.1:0"],
            "trigger": trigger,
            "io": "splice",
            "limits": {"max_connections": 30},
            "logging": {"level": "debug"},
        },
    )
    daemon = Daemon(config, nofile=100)  # 30 splice connections would need ~100 fds
    try:
        with connections(daemon.port, 30) as clients:
            for sock in clients:
                roundtrip(sock, b"served")
        [warning] = daemon.wait_for("splice_unavailable")
        kinds = [e["io"] for e in daemon.events("connection_opened")]
        assert kinds.count("splice") == warning["budget"] > 0
        assert kinds.count("copy") == 30 - warning["budget"] > 0
        assert not daemon.events("accept_paused")
    finally:
        daemon.stop()
