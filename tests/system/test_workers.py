"""workers: 2 under a real systemd 252: READY from the supervisor once every worker
serves, no worker notifies, a SIGSTOPped worker is replaced (the service stays), a
SIGSTOPped supervisor is restarted by the watchdog, reload and stop reach every worker,
and `systemctl restart` hands every worker's connections to the next supervisor's
workers through the fd store (with bound and with socket-activated listeners)."""

from __future__ import annotations

import socket
import threading
from typing import Any

import pytest
from nspawn import Container, wait_until
from test_service import (
    HOST,
    NEW_PORT,
    PORT,
    SOCKET_PORT,
    WAIT_S,
    drop_in,
    echo_once,
    events,
    journal_text,
    main_pid,
    serves,
)
from test_service import c as c  # the reset container (fixture)
from test_service import cursor as cursor  # a journal cursor (fixture)

from tests.traffic import recv_exactly, recv_until_eof

pytestmark = pytest.mark.system

CONFIG = f'listen:\n  - "{HOST}:{PORT}"\nshutdown_timeout: 5s\nworkers: 2\n'


def children(c: Container, pid: int) -> list[int]:
    return [int(p) for p in c.read_file(f"/proc/{pid}/task/{pid}/children").split()]


def worker_events(c: Container, cursor: str, event: str) -> list[dict[str, Any]]:
    return [e for e in events(c, cursor) if e["event"] == event]


def start_with_workers(c: Container, watchdog_s: int | None = None) -> int:
    c.write_file("/etc/epolld.yaml", CONFIG)
    if watchdog_s is not None:
        drop_in(c, "epolld.service", f"[Service]\nWatchdogSec={watchdog_s}s\n")
    c.systemctl("start", "epolld")
    return main_pid(c)


def test_ready_comes_from_the_supervisor_once_both_workers_serve(c: Container, cursor: str) -> None:
    """Active means both workers serve; MainPID is the supervisor, whose two children are
    the workers; no worker sent a notification systemd had to refuse."""
    pid = start_with_workers(c)
    assert c.show("epolld.service", "ActiveState") == "active"
    ready = worker_events(c, cursor, "worker_ready")
    assert sorted(int(e["worker"]) for e in ready) == [1, 2]
    assert sorted(children(c, pid)) == sorted(int(e["pid"]) for e in ready)
    assert worker_events(c, cursor, "workers_ready")
    assert echo_once(PORT, b"two workers\n") == b"two workers\n"
    assert "2 workers" in c.show("epolld.service", "StatusText")
    assert "reception only permitted for main PID" not in journal_text(c, cursor)


def test_stopped_worker_is_replaced_and_the_service_stays(c: Container, cursor: str) -> None:
    """A SIGSTOPped worker stops checking in: the supervisor kills and replaces it before
    systemd's watchdog fires; MainPID and NRestarts stay, the watchdog keeps being fed."""
    pid = start_with_workers(c, watchdog_s=2)
    restarts = c.show("epolld.service", "NRestarts")
    stuck = int(worker_events(c, cursor, "worker_started")[0]["pid"])
    c.run("kill", "-STOP", str(stuck))
    wait_until(
        lambda: any(
            e.get("reason") == "unresponsive" and int(e["pid"]) == stuck
            for e in worker_events(c, cursor, "worker_exited")
        ),
        WAIT_S,
        "the stopped worker to be replaced",
    )
    wait_until(lambda: len(worker_events(c, cursor, "worker_ready")) >= 3, WAIT_S, "a new worker")
    ping = c.show("epolld.service", "WatchdogTimestampMonotonic")
    wait_until(
        lambda: c.show("epolld.service", "WatchdogTimestampMonotonic") != ping,
        WAIT_S,
        "WATCHDOG=1 again once every worker checks in",
    )
    assert main_pid(c) == pid
    assert c.show("epolld.service", "NRestarts") == restarts
    assert stuck not in children(c, pid)
    assert "Watchdog timeout" not in journal_text(c, cursor)
    wait_until(lambda: serves(PORT), WAIT_S, "both workers to serve")


def test_stopped_supervisor_is_restarted_by_the_watchdog(c: Container, cursor: str) -> None:
    """A SIGSTOPped supervisor sends no WATCHDOG=1 however healthy its workers are: systemd
    restarts the service, workers and all."""
    pid = start_with_workers(c, watchdog_s=2)
    old_workers = children(c, pid)
    c.run("kill", "-STOP", str(pid))
    wait_until(
        lambda: main_pid(c) not in (0, pid) and c.show("epolld.service", "ActiveState") == "active",
        WAIT_S,
        "the watchdog to restart epolld",
    )
    assert "Watchdog timeout" in journal_text(c, cursor)
    new_pid = main_pid(c)
    assert not set(children(c, new_pid)) & set(old_workers)
    wait_until(lambda: serves(PORT), WAIT_S, "the restarted service to serve")


def test_reload_and_stop_reach_both_workers(c: Container, cursor: str) -> None:
    """systemctl reload: both workers apply it and the unit is active again; systemctl
    stop: both drain and the supervisor exits 0."""
    start_with_workers(c)
    c.write_file("/etc/epolld.yaml", CONFIG + "stats_interval: 30s\n")
    c.systemctl("reload", "epolld")
    wait_until(lambda: worker_events(c, cursor, "workers_reloaded"), WAIT_S, "the reload")
    reloaded = {int(e["worker"]) for e in worker_events(c, cursor, "config_reloaded")}
    assert reloaded == {1, 2}
    assert c.show("epolld.service", "ActiveState") == "active"
    c.systemctl("stop", "epolld")
    assert c.show("epolld.service", "ExecMainStatus") == "0"
    assert c.show("epolld.service", "Result") == "success"
    started = {
        int(e["worker"]) for e in worker_events(c, cursor, "shutdown_started") if "worker" in e
    }
    assert started == {1, 2}


RESTART_CONNECTIONS = 200  # spread over both workers by the kernel
RESTART_STREAM_BYTES = 4 * 1024 * 1024


def _open(port: int, count: int) -> list[socket.socket]:
    socks = []
    for i in range(count):
        sock = socket.create_connection((HOST, port), timeout=WAIT_S)
        line = b"before %d\n" % i
        sock.sendall(line)
        assert recv_exactly(sock, len(line), WAIT_S) == line
        socks.append(sock)
    return socks


def _echo_each(socks: list[socket.socket], word: bytes) -> None:
    for sock in socks:
        sock.sendall(word)
        assert recv_exactly(sock, len(word), WAIT_S) == word


def _supervisor_events(c: Container, cursor: str, event: str) -> list[dict[str, Any]]:
    return [e for e in worker_events(c, cursor, event) if "worker" not in e]


def _restart_keeps_connections(c: Container, cursor: str, port: int) -> None:
    """Open connections on both workers and a stream whose echo is unread, restart, and
    check that every one goes on byte-exact under new workers of a new supervisor."""
    socks = _open(port, RESTART_CONNECTIONS)
    stream = socket.create_connection((HOST, port), timeout=WAIT_S)
    stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    payload = bytes(range(256)) * (RESTART_STREAM_BYTES // 256)
    sender = threading.Thread(target=stream.sendall, args=(payload,), daemon=True)
    sender.start()  # its echo waits, mostly unread, through the restart
    pid = main_pid(c)
    old_workers = set(children(c, pid))
    assert len(old_workers) == 2

    c.systemctl("restart", "epolld")
    complete = wait_until(
        lambda: _supervisor_events(c, cursor, "handoff_complete") or None,
        WAIT_S,
        "the new supervisor's handoff_complete",
    )[0]

    _echo_each(socks, b"after\n")
    assert recv_exactly(stream, len(payload), WAIT_S) == payload
    sender.join(WAIT_S)
    stream.shutdown(socket.SHUT_WR)
    assert recv_until_eof(stream, WAIT_S) == b""
    for sock in socks:
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(10) == b""  # a FIN, not a reset
        sock.close()
    stream.close()
    new_pid = main_pid(c)
    assert new_pid != pid
    assert complete["old_pid"] == str(pid)
    assert complete["workers"] == "2"
    assert int(complete["connections"]) >= RESTART_CONNECTIONS + 1
    handed = {int(e["worker"]) for e in worker_events(c, cursor, "worker_handed_over")}
    assert handed == {1, 2}
    new_workers = set(children(c, new_pid))
    assert len(new_workers) == 2
    assert not new_workers & old_workers
    assert c.show("epolld.service", "ActiveState") == "active"
    assert c.show("epolld.service", "NFileDescriptorStore") == "0"  # taken out again
    text = journal_text(c, cursor)
    assert "Killing process" not in text  # every old worker had exited on its own
    assert not worker_events(c, cursor, "handoff_failed")


def test_restart_hands_every_workers_connections_over(c: Container, cursor: str) -> None:
    """systemctl restart (RestartKillSignal=SIGUSR2 to the supervisor): both workers hand
    their connections up, the supervisor stores them with its listeners and exits, and the
    next supervisor's two workers take them over; the store is empty afterwards. An
    address added to the file before the restart is served by the new workers."""
    start_with_workers(c)
    c.write_file(
        "/etc/epolld.yaml", CONFIG.replace("listen:\n", f'listen:\n  - "{HOST}:{NEW_PORT}"\n')
    )
    _restart_keeps_connections(c, cursor, PORT)
    assert echo_once(PORT, b"fresh\n") == b"fresh\n"
    assert echo_once(NEW_PORT, b"added\n") == b"added\n"
    listening = [
        e for e in worker_events(c, cursor, "listening") if e["address"].endswith(f":{NEW_PORT}")
    ]
    assert sorted(int(e["worker"]) for e in listening) == [1, 2]
    assert not worker_events(c, cursor, "handoff_kept")


def test_restart_with_socket_activation_and_workers(c: Container, cursor: str) -> None:
    """With epolld.socket, both workers share systemd's socket; a restart hands their
    connections over and systemd passes the socket again itself."""
    drop_in(c, "epolld.socket", f"[Socket]\nListenStream=\nListenStream={HOST}:{SOCKET_PORT}\n")
    c.write_file("/etc/epolld.yaml", CONFIG)
    c.systemctl("start", "epolld.socket")
    c.systemctl("start", "epolld.service")
    _restart_keeps_connections(c, cursor, SOCKET_PORT)
    assert echo_once(SOCKET_PORT, b"fresh\n") == b"fresh\n"
