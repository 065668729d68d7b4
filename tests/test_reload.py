"""SIGHUP reload against the real daemon: listeners swap without a gap, nothing is lost."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest
import yaml

from tests.conftest import StartDaemon
from tests.epolld_process import Daemon
from tests.traffic import connect, connections, pump, roundtrip

pytestmark = pytest.mark.slow


def rewrite(daemon: Daemon, **changes: object) -> None:
    settings = yaml.safe_load(daemon.config_path.read_text())
    settings.update(changes)
    daemon.config_path.write_text(yaml.safe_dump(settings))


def reload(daemon: Daemon, event: str = "config_reloaded") -> dict[str, object]:
    before = len(daemon.events(event))
    daemon.signal(signal.SIGHUP)
    return daemon.wait_for(event, count=before + 1)[-1]


def test_reload_moves_listener_and_keeps_connections(start_daemon: StartDaemon) -> None:
    """A new address serves, the removed one refuses, and an open connection keeps echoing."""
    daemon = start_daemon()
    old_port = daemon.port
    with connect(old_port) as before:
        roundtrip(before, b"before")
        rewrite(daemon, listen=["127.0.0.2:0"])
        changed = reload(daemon)
        assert "listen" in changed["changes"]
        new = daemon.wait_for("listening", count=2)[-1]["address"]
        assert new.startswith("127.0.0.2:")
        with connect(int(new.rsplit(":", 1)[1]), host="127.0.0.2") as after:
            roundtrip(after, b"on the new address")
        with pytest.raises(ConnectionRefusedError):
            connect(old_port).close()
        roundtrip(before, b"after")
        daemon.wait_for("listener_closed")


def test_reload_keeps_listener_socket_when_address_stays(start_daemon: StartDaemon) -> None:
    """An address present before and after keeps its socket (same fd): no gap in accepting."""
    daemon = start_daemon()
    [first] = daemon.wait_for("listening")
    rewrite(daemon, limits={"max_connections": 100})
    reload(daemon)
    assert len(daemon.events("listening")) == 1  # nothing was re-bound
    with connect(daemon.port) as sock:
        roundtrip(sock, b"same socket")
    assert first["fd"] == daemon.events("listening")[0]["fd"]


def test_reload_that_cannot_bind_keeps_old_listeners(start_daemon: StartDaemon) -> None:
    """If a new address is taken, the reload fails as a whole and the old listener serves."""
    daemon = start_daemon()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        rewrite(daemon, listen=["127.0.0.1:0", f"127.0.0.1:{taken}"], limits={"max_connections": 1})
        failed = reload(daemon, "config_reload_failed")
    assert f"127.0.0.1:{taken}: address already in use" in str(failed["error"])
    with connect(daemon.port) as a, connect(daemon.port) as b:  # max_connections not applied
        roundtrip(a, b"old config")
        roundtrip(b, b"still in force")


def test_reload_applies_limits_and_log_level(start_daemon: StartDaemon) -> None:
    """New limits apply to the next peers, and a new log level to the next log lines."""
    daemon = start_daemon()
    rewrite(daemon, limits={"max_connections": 1}, logging={"level": "warning"})
    changed = reload(daemon)
    assert set(changed["changes"]) >= {"limits.max_connections", "logging.level"}
    with connect(daemon.port) as first:
        roundtrip(first, b"the only one")
        with connect(daemon.port) as second:
            second.settimeout(5)
            assert second.recv(10) == b""
        daemon.wait_for("connection_refused")
    assert not [
        e for e in daemon.logs[daemon.logs.index(changed) + 1 :] if e["level"] in ("debug", "info")
    ]


def test_50_reloads_while_streaming_lose_nothing(start_daemon: StartDaemon) -> None:
    """50 SIGHUPs in a row, alternating buffer and limit settings, while 10 clients stream:
    every byte comes back."""
    daemon = start_daemon()
    payloads = [os.urandom(8 << 20) for _ in range(10)]
    socks = [connect(daemon.port) for _ in payloads]
    results: list[list[bytes]] = []
    thread = threading.Thread(
        target=lambda: results.append(pump(list(zip(socks, payloads, strict=True)), timeout=60))
    )
    thread.start()
    variants = [
        {"buffers": {"read_size": "16KiB", "high_water": "64KiB", "low_water": "16KiB"}},
        {"buffers": {"read_size": "256KiB"}, "limits": {"idle_timeout": "10s"}},
    ]
    for i in range(50):
        rewrite(daemon, **variants[i % 2])
        daemon.signal(signal.SIGHUP)
        time.sleep(0.02)
    thread.join(90)
    for sock in socks:
        sock.close()
    assert results, "the streaming clients did not finish"
    for payload, echo in zip(payloads, results[0], strict=True):
        assert echo == payload
    assert daemon.proc.poll() is None
    daemon.wait_for("config_reloaded")
    assert not daemon.events("config_reload_failed")


def test_reload_switches_trigger_mode(start_daemon: StartDaemon) -> None:
    """Switching trigger mode on reload keeps old connections echoing and serves new ones,
    including a burst of connections larger than one accept budget."""
    daemon = start_daemon({"backlog": 8})
    settings = yaml.safe_load(daemon.config_path.read_text())
    other = "edge" if settings["trigger"] == "level" else "level"
    with connect(daemon.port) as before:
        roundtrip(before, b"before")
        rewrite(daemon, trigger=other)
        assert "trigger" in reload(daemon)["changes"]
        with connections(daemon.port, 40) as burst:  # five accept budgets of 8
            for sock in burst:
                roundtrip(sock, b"after the switch")
        roundtrip(before, b"after")


def test_reload_to_overlapping_wildcard_says_why(start_daemon: StartDaemon) -> None:
    """127.0.0.1:P -> 0.0.0.0:P cannot be bound beside the old listener: the reload fails,
    says that the daemon itself holds the port, and the old listener keeps serving."""
    daemon = start_daemon()
    port = daemon.port
    rewrite(daemon, listen=[f"0.0.0.0:{port}"])
    failed = reload(daemon, "config_reload_failed")
    assert f"it overlaps 127.0.0.1:{port}, which this daemon holds" in str(failed["error"])
    with connect(port) as sock:
        roundtrip(sock, b"old listener")


def test_stats_interval_logs_periodically_and_reload_changes_it(start_daemon: StartDaemon) -> None:
    """stats_interval logs a stats line on its own; a reload from 0 (off) turns it on."""
    daemon = start_daemon({"stats_interval": 0})
    rewrite(daemon, stats_interval="200ms")
    reload(daemon)
    daemon.wait_for("stats", count=3)  # the first within ~1 s, then every 200 ms
