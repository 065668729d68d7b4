"""The restart handoff under a real systemd 252, with the installed Debian package (issue 13).

`systemctl restart` and an upgrade to a newer package send RestartKillSignal=SIGUSR2: the
old process hands its listeners and 1,000 connections of mixed kinds (one in the middle of
its PROXY header, in each io mode) through the file
descriptor store, and the next process serves them on; the clients verify every byte
and see no reset. `systemctl stop` still drains with a FIN, and the store is empty
whenever no restart is under way. A SIGKILL restart (a crash) closes the connections
(the kernel does, as the process dies) and starts afresh with an empty store. A restart
whose old process is SIGKILLed while storing its transport (strace makes its Nth sendmsg
the last) leaves no leftovers in the store (issue 20): killed before its state, the next
process closes the stranded connections; killed after it, it takes them over.

The clients run in the container's network namespace (the container fixture enters it).
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from nspawn import Container, ensure_host_tool, wait_until
from test_deb import UPGRADE_VERSION, _install, container
from test_service import c as c  # the checkout's units, reset (fixture)
from test_service import cursor as cursor  # a journal cursor (fixture)
from test_service import events

from tests.traffic import recv_exactly, recv_until_eof

pytestmark = pytest.mark.system
__all__ = ["container"]  # a fixture shared with test_deb (debs is conftest.py's)

WAIT_S = 30.0
IO_TIMEOUT_S = 30.0
# Per io mode. Sizes against the buffers: high_water 8 MiB; on the way the kernel absorbs
# up to ~4 MiB (the daemon's autotuned send buffer) beside a 4 KiB client receive buffer.
PINGPONG = 394  # half over IPv4, half over IPv6
STREAMS = 100
HALF_CLOSED = 4  # read to EOF below high water, not all of the echo sent yet
PAUSED = 1  # sending PAUSED_BYTES without reading: above high water, reading paused
PAUSED_BYTES = 48 * 1024 * 1024
STREAM_BYTES = 64 * 1024  # each way before the restart, again after it
HALF_CLOSED_BYTES = 6 * 1024 * 1024
TIGHT_LOOP_MAX = 5_000

PROXY_PORT = 7081
HALF_HEADER = b"PROXY TCP6 2001:db8::5 ::1 5555 7081\r\n"
CONFIG = """\
listen:
  - "127.0.0.1:7080"
  - "[::1]:7080"
  - {{address: "[::1]:7081", proxy_protocol: true}}
proxy: {{timeout: 120s}}
io: {io}
buffers: {{high_water: 8MiB, low_water: 1MiB}}
logging: {{connections: false}}
"""


def _connect(host: str, small_rcvbuf: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    if small_rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(IO_TIMEOUT_S)
    sock.connect((host, 7080))
    return sock


class _Sender(threading.Thread):
    def __init__(self, sock: socket.socket, payload: bytes) -> None:
        super().__init__(daemon=True)
        self.sock, self.payload = sock, payload
        self.errors: list[BaseException] = []

    def run(self) -> None:
        try:
            self.sock.sendall(self.payload)
            self.sock.shutdown(socket.SHUT_WR)
        except BaseException as e:  # reported by the test
            self.errors.append(e)


class _TightLoop(threading.Thread):
    """Connect, echo a line, close; again and again until told to stop."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.done = threading.Event()
        self.count = 0
        self.failures: list[BaseException] = []

    def run(self) -> None:
        while not self.done.is_set() and self.count < TIGHT_LOOP_MAX:
            line = f"tight {self.count}\n".encode()
            try:
                with _connect("127.0.0.1") as sock:
                    sock.sendall(line)
                    assert recv_exactly(sock, len(line), IO_TIMEOUT_S) == line
            except BaseException as e:  # reported by the test
                self.failures.append(e)
                return
            self.count += 1


class _Clients:
    """1,000 connections of every kind, half copying and half splicing."""

    def __init__(self, c: Container) -> None:
        self.c = c
        self.rng = random.Random(13)
        self.pingpong: list[socket.socket] = []
        self.streams: list[tuple[socket.socket, bytes]] = []
        self.half_closed: list[tuple[socket.socket, bytes, _Sender]] = []
        self.paused: list[tuple[socket.socket, bytes, _Sender]] = []
        self.mid_header: list[socket.socket] = []

    def open(self) -> None:
        for io in ("copy", "splice"):
            self.c.write_file("/etc/epolld.yaml", CONFIG.format(io=io))
            before = len(_events(self.c, "config_reloaded"))
            self.c.systemctl("reload", "epolld")
            try:
                wait_until(
                    lambda before=before: len(_events(self.c, "config_reloaded")) > before,
                    WAIT_S,
                    "the reload",
                )
            except TimeoutError:
                raise AssertionError(_journal_tail(self.c)) from None
            self._open_some(io)

    def _open_some(self, io: str) -> None:
        # A PROXY header half sent: completed only after the restart and the upgrade.
        sock = socket.create_connection(("::1", PROXY_PORT), timeout=IO_TIMEOUT_S)
        sock.sendall(HALF_HEADER[:20])
        self.mid_header.append(sock)
        for i in range(PINGPONG):
            sock = _connect("::1" if i % 2 else "127.0.0.1")
            sock.sendall(b"before\n")
            assert recv_exactly(sock, 7, IO_TIMEOUT_S) == b"before\n"
            self.pingpong.append(sock)
        for _ in range(STREAMS):
            payload = self.rng.randbytes(2 * STREAM_BYTES)
            sock = _connect("127.0.0.1")
            sock.sendall(payload[:STREAM_BYTES])  # its echo waits, unread, through the restart
            self.streams.append((sock, payload))
        for i in range(HALF_CLOSED):
            payload = self.rng.randbytes(HALF_CLOSED_BYTES)
            sock = _connect("::1" if i % 2 else "127.0.0.1", small_rcvbuf=True)
            # From a thread: with splice the pipe, not high water, bounds what is read, and
            # the send may wait for the echo to be read.
            sender = _Sender(sock, payload)
            sender.start()
            if io == "copy":  # below high water: all of it is read, and the EOF
                sender.join(IO_TIMEOUT_S)
            self.half_closed.append((sock, payload, sender))
        for _ in range(PAUSED):
            payload = self.rng.randbytes(PAUSED_BYTES)
            sock = _connect("127.0.0.1", small_rcvbuf=True)
            sender = _Sender(sock, payload)
            sender.start()
            self.paused.append((sock, payload, sender))

    @property
    def count(self) -> int:
        return (
            len(self.pingpong)
            + len(self.streams)
            + len(self.half_closed)
            + len(self.paused)
            + len(self.mid_header)
        )

    def pingpong_again(self, word: bytes) -> None:
        for sock in self.pingpong:
            sock.sendall(word)
            assert recv_exactly(sock, len(word), IO_TIMEOUT_S) == word

    def finish_all_but_pingpong(self) -> None:
        """Every echo, to the last byte, then the daemon's FIN after the client's."""
        for sock, payload in self.streams:
            sock.sendall(payload[STREAM_BYTES:])
            sock.shutdown(socket.SHUT_WR)
            assert recv_until_eof(sock, IO_TIMEOUT_S) == payload
        for sock, payload, sender in self.half_closed:
            assert recv_until_eof(sock, IO_TIMEOUT_S) == payload
            sender.join(IO_TIMEOUT_S)
            assert not sender.errors
        for sock, payload, sender in self.paused:
            assert recv_until_eof(sock, IO_TIMEOUT_S) == payload
            sender.join(IO_TIMEOUT_S)
            assert not sender.errors
        self.pingpong_again(b"after\n")
        for sock in self.mid_header:
            sock.sendall(HALF_HEADER[20:] + b"behind the header\n")
            assert recv_exactly(sock, 18, IO_TIMEOUT_S) == b"behind the header\n"
            sock.shutdown(socket.SHUT_WR)
            assert recv_until_eof(sock, IO_TIMEOUT_S) == b""

    def close(self) -> None:
        for sock in [*self.pingpong, *(s for s, *_ in self.streams)]:
            sock.close()
        for sock, *_ in [*self.half_closed, *self.paused]:
            sock.close()
        for sock in self.mid_header:
            sock.close()


def _journal_tail(c: Container) -> str:
    return c.run("journalctl", "--no-pager", "-u", "epolld", "-n", "40").stdout


def _store_size(c: Container) -> int:
    return int(c.show("epolld", "NFileDescriptorStore") or 0)


def _events(c: Container, event: str) -> list[dict[str, Any]]:
    """Every entry of that event so far (journalctl 252 combines --after-cursor with a
    field match badly: tests count entries instead)."""
    return c.journal("-u", "epolld", f"EPOLLD_EVENT={event}")


def _through(c: Container, clients: _Clients, action: Callable[[], None]) -> dict[str, Any]:
    """Run action (a restart, an upgrade) with a tight-loop client beside the open
    connections; return the new process's handoff_complete entry."""
    before = len(_events(c, "handoff_complete"))
    tight = _TightLoop()
    tight.start()
    action()
    complete = wait_until(
        lambda: _events(c, "handoff_complete")[before:] or None, WAIT_S, "handoff_complete"
    )[0]
    clients.pingpong_again(b"during\n")
    tight.done.set()
    tight.join(IO_TIMEOUT_S)
    assert not tight.failures, tight.failures[:1]
    assert tight.count > 0
    started = _events(c, "handoff_started")[before]
    records = json.loads(started["EPOLLD_RECORDS"])
    assert int(started["EPOLLD_CONNECTIONS"]) + records["proxy_header"] >= clients.count
    assert records["proxy_header"] == len(clients.mid_header)
    assert int(started["EPOLLD_PAUSED"]) >= 1
    assert int(started["EPOLLD_HALF_CLOSED"]) >= 1
    assert int(complete["EPOLLD_CONNECTIONS"]) == int(started["EPOLLD_CONNECTIONS"])
    assert c.show("epolld", "ActiveState") == "active"
    # The transport was taken out of the store: nothing there to be handed over twice.
    wait_until(lambda: _store_size(c) == 0 or None, WAIT_S, "an empty fd store")
    return complete


def test_restart_and_upgrade_keep_every_connection(
    container: Container, debs: dict[str, Path]
) -> None:
    """1,000 connections of every kind live through `systemctl restart` and an upgrade to
    a newer package byte-exact, a client connecting throughout is always served, and
    `systemctl stop` afterwards still drains them with a FIN and empties the store."""
    c = container
    _install(c, debs["current"])
    c.wait_for_state("epolld", ["active"], WAIT_S)
    clients = _Clients(c)
    try:
        _restart_upgrade_stop(c, clients, debs)
    finally:
        clients.close()


def _restart_upgrade_stop(c: Container, clients: _Clients, debs: dict[str, Path]) -> None:
    clients.open()
    assert clients.count >= 1000
    pid = int(c.show("epolld", "MainPID"))

    complete = _through(c, clients, lambda: c.systemctl("restart", "epolld"))
    assert complete["EPOLLD_OLD_PID"] == str(pid)
    assert int(c.show("epolld", "MainPID")) != pid
    duration = float(complete["EPOLLD_DURATION_S"])
    assert duration > 0

    pid = int(c.show("epolld", "MainPID"))
    complete = _through(c, clients, lambda: _install(c, debs["newer"]))
    assert c.run("dpkg-query", "-W", "-f=${Version}", "epolld").stdout == UPGRADE_VERSION
    assert complete["EPOLLD_OLD_PID"] == str(pid)
    clients.finish_all_but_pingpong()

    # Stop: the ping-pong connections, idle and open, are drained with a FIN (no reset).
    c.systemctl("stop", "epolld")
    for sock in clients.pingpong:
        assert recv_until_eof(sock, IO_TIMEOUT_S) == b""
    assert c.show("epolld", "ActiveState") == "inactive"
    assert _store_size(c) == 0


def test_sigkill_restart_starts_afresh(container: Container, debs: dict[str, Path]) -> None:
    """A SIGKILL (a crash; the watchdog's SIGABRT alike) hands nothing over: the kernel
    closes the connections as the process dies, systemd restarts the service with an empty
    store, and it serves new connections."""
    c = container
    _install(c, debs["current"])
    c.wait_for_state("epolld", ["active"], WAIT_S)
    sock = _connect("127.0.0.1")
    sock.sendall(b"x\n")
    assert recv_exactly(sock, 2, IO_TIMEOUT_S) == b"x\n"
    pid = int(c.show("epolld", "MainPID"))
    c.systemctl("kill", "--signal=SIGKILL", "epolld")
    # The FIN the kernel sent for the dead process (a reset is as good: closed, not hung).
    with contextlib.suppress(ConnectionResetError):
        assert sock.recv(10) == b""
    sock.close()
    wait_until(
        lambda: int(c.show("epolld", "MainPID") or 0) not in (0, pid) or None,
        WAIT_S,
        "the restarted process",
    )
    c.wait_for_state("epolld", ["active"], WAIT_S)
    assert c.show("epolld", "NRestarts") == "1"
    assert _store_size(c) == 0
    with _connect("127.0.0.1") as fresh:
        fresh.sendall(b"again\n")
        assert recv_exactly(fresh, 6, IO_TIMEOUT_S) == b"again\n"


# -- a handoff killed half-stored (issue 20) --------------------------------------------

KILLED_CONFIG = 'listen:\n  - "127.0.0.1:7080"\nshutdown_timeout: 5s\nworkers: {workers}\n'
# The old process's sendmsg calls in a handoff, by `workers`. One process: the listener
# into pair0 and the client connections into pair1 (those may stay behind past the
# in-flight limit, so they travel apart: handoff.send_descriptors_upto), FDSTORE of
# pair0-a, pair0-b, pair1-a, pair1-b, the state memfd, then BARRIER=1. A supervisor: its
# workers' transports into pair0, FDSTORE of pair0-a, pair0-b, the state, BARRIER=1.
BEFORE_THE_STATE = {1: 7, 2: 4}
AFTER_THE_STATE = {1: 8, 2: 5}


def _kill_at(c: Container, pid: int, sendmsg: int) -> subprocess.Popen[bytes]:
    """strace from the host on MainPID: its sendmsg-th sendmsg fails and SIGKILL ends it
    (what it stored before stays in the store)."""
    host_pid = c.host_pid(pid)
    tracer = subprocess.Popen(
        [
            "strace", "-qq", "-o", "/dev/null", "-p", str(host_pid), "-e", "trace=sendmsg",
            "-e", f"inject=sendmsg:error=EPIPE:signal=SIGKILL:when={sendmsg}",
        ],
        stdin=subprocess.DEVNULL,
    )  # fmt: skip

    def attached() -> bool:
        status = Path(f"/proc/{host_pid}/status").read_text()
        return any(
            ln.split()[1] != "0" for ln in status.splitlines() if ln.startswith("TracerPid:")
        )

    wait_until(attached, WAIT_S, "strace to attach")
    return tracer


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize(
    "kill_at", [BEFORE_THE_STATE, AFTER_THE_STATE], ids=["before-state", "after-state"]
)
def test_handoff_killed_while_storing_leaves_no_leftovers(
    c: Container, cursor: str, workers: int, kill_at: dict[int, int]
) -> None:
    """A restart whose old process is SIGKILLed while storing its transport: killed
    before its state, the next process closes the stranded connections (EOF, not a hang)
    and removes the leftovers; killed after it, the next one takes every connection
    over. Either way the store is empty once it is up, new connections are served, and
    the restart after that keeps every connection echoing."""
    ensure_host_tool("strace", "strace")
    c.write_file("/etc/epolld.yaml", KILLED_CONFIG.format(workers=workers))
    c.systemctl("start", "epolld")
    pid = int(c.show("epolld", "MainPID"))
    stranded = [_connect("127.0.0.1") for _ in range(4)]
    survivors: list[socket.socket] = []
    try:
        for sock in stranded:
            sock.sendall(b"before\n")
            assert recv_exactly(sock, 7, IO_TIMEOUT_S) == b"before\n"
        tracer = _kill_at(c, pid, kill_at[workers])
        c.systemctl("restart", "epolld", check=False)  # its stop ends in a SIGKILL
        assert tracer.wait(WAIT_S) is not None
        wait_until(
            lambda: int(c.show("epolld", "MainPID") or 0) not in (0, pid) or None,
            WAIT_S,
            "the next process",
        )
        c.wait_for_state("epolld", ["active"], WAIT_S)
        try:
            wait_until(lambda: _store_size(c) == 0 or None, WAIT_S, "an empty fd store")
        except TimeoutError:
            raise AssertionError(f"{_store_size(c)} stored:\n{_journal_tail(c)}") from None
        logged = {e["event"] for e in events(c, cursor)}
        if kill_at is BEFORE_THE_STATE:
            assert "handoff_leftovers_removed" in logged, _journal_tail(c)
            for sock in stranded:  # closed with the leftovers: a FIN (or a reset)
                with contextlib.suppress(ConnectionResetError):
                    assert sock.recv(10) == b""
                sock.close()
        else:
            assert "handoff_complete" in logged, _journal_tail(c)
            survivors += stranded
        stranded = []
        survivors += [_connect("127.0.0.1") for _ in range(20)]
        for sock in survivors:
            sock.sendall(b"one\n")
            assert recv_exactly(sock, 4, IO_TIMEOUT_S) == b"one\n"
        cursor = c.journal_cursor()
        pid = int(c.show("epolld", "MainPID"))
        c.systemctl("restart", "epolld")
        wait_until(
            lambda: any(e["event"] == "handoff_complete" for e in events(c, cursor)) or None,
            WAIT_S,
            "handoff_complete",
        )
        assert int(c.show("epolld", "MainPID")) != pid
        for sock in survivors:
            sock.sendall(b"two\n")
            assert recv_exactly(sock, 4, IO_TIMEOUT_S) == b"two\n"
        with _connect("127.0.0.1") as fresh:
            fresh.sendall(b"new\n")
            assert recv_exactly(fresh, 4, IO_TIMEOUT_S) == b"new\n"
        wait_until(lambda: _store_size(c) == 0 or None, WAIT_S, "an empty fd store")
        assert c.show("epolld", "ActiveState") == "active"
    finally:
        for sock in [*stranded, *survivors]:
            sock.close()
