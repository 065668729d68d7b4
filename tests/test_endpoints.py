"""The daemon's own listeners (metrics, HAProxy's agent, the control socket) out of
descriptors: each pauses instead of spinning and answers its waiting client once
descriptors are free again (listening/endpoint.py). Real daemon, RLIMIT_NOFILE lowered
in its process before exec.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from epolld import control
from tests import seccomp_notify
from tests.epolld_process import WAIT_S, Daemon, write_config
from tests.traffic import connect, recv_until_eof, roundtrip

pytestmark = pytest.mark.slow

NOFILE = 40  # the daemon's descriptors: a few echo clients take the rest
ECHO_CLIENTS = 60  # more than NOFILE: the last ones wait in the backlog


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    config = {
        "listen": ["127.0.0.1:0"],
        "stats_interval": "0s",
        "metrics": {"listen": "127.0.0.1:0"},
        "agent": {"listen": "127.0.0.1:0"},
        "control": {"socket": str(tmp_path / "control.sock")},
    }
    started = Daemon(write_config(tmp_path / "epolld.yaml", config), nofile=NOFILE)
    try:
        started.wait_for("listening")
        yield started
    finally:
        started.stop()
    assert not started.bad_lines, started.bad_lines[:5]


def _port(daemon: Daemon, event: str) -> int:
    return int(daemon.wait_for(event)[0]["address"].rsplit(":", 1)[1])


def test_endpoints_pause_out_of_descriptors_and_answer_after(daemon: Daemon) -> None:
    """With every descriptor taken by echo clients, a client of the metrics endpoint, of the
    agent and of the control socket each makes its endpoint pause (one log line each, no
    spinning); once the echo clients leave, all three are answered."""
    metrics_port = _port(daemon, "metrics_listening")
    agent_port = _port(daemon, "agent_listening")
    control_path = daemon.wait_for("control_listening")[0]["address"].removeprefix("unix:")
    with contextlib.ExitStack() as stack:
        echo = [stack.enter_context(connect(daemon.port)) for _ in range(ECHO_CLIENTS)]
        daemon.wait_for("accept_paused")  # the echo listener: no descriptor left
        metrics = stack.enter_context(connect(metrics_port))
        metrics.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        agent = stack.enter_context(connect(agent_port))
        control = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        control.settimeout(WAIT_S)
        control.connect(control_path)  # into the backlog
        control.sendall(b"status\n")
        for event in ("metrics_accept_paused", "agent_accept_paused", "control_accept_paused"):
            [paused] = daemon.wait_for(event)[:1]
            assert paused["error"] == "EMFILE"
        cpu_before = daemon.cpu_seconds()
        time.sleep(1.0)
        cpu_used = daemon.cpu_seconds() - cpu_before
        assert not daemon.events("control_accept_failed")
        assert not daemon.events("accept_failed")
        roundtrip(echo[0], b"accepted before the limit")
        for sock in echo:
            sock.close()
        assert recv_until_eof(agent).decode().startswith("up ready ")
        assert recv_until_eof(metrics).startswith(b"HTTP/1.1 200 ")
        assert json.loads(recv_until_eof(control))["ok"] is True
    # Each endpoint retries every ACCEPT_RETRY_S: a few dozen wakeups a second at most,
    # not a level-triggered spin (381,189 a second, measured).
    assert cpu_used < 0.2, f"{cpu_used:.2f} s of CPU in 1 s while out of descriptors"


def test_a_silent_control_client_is_closed_at_its_deadline(daemon: Daemon) -> None:
    """A control client that sends no command is closed after CLIENT_TIMEOUT_S, unanswered,
    and the socket still answers the next one."""
    path = daemon.wait_for("control_listening")[0]["address"].removeprefix("unix:")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.settimeout(WAIT_S)
        silent.connect(path)
        started = time.monotonic()
        assert recv_until_eof(silent) == b""
        waited = time.monotonic() - started
    assert control.CLIENT_TIMEOUT_S - 0.1 <= waited < WAIT_S
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(WAIT_S)
        client.connect(path)
        client.sendall(b"status\n")
        assert json.loads(recv_until_eof(client))["ok"] is True


def _listening_inode(port: int) -> str:
    """The socket inode of the TCP listener on 127.0.0.1:port (/proc/net/tcp, state 0A)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == f"0100007F:{port:04X}" and fields[3] == "0A":
            return fields[9]
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


def test_a_connection_aborted_in_the_backlog_is_skipped(tmp_path: Path) -> None:
    """accept() failing with ECONNABORTED (a client that left the backlog) is neither a
    pause nor a failure: the endpoint goes straight on to the next accept() of the same
    wakeup, and the client behind is answered. The kernel fails the agent's first
    accept4() for real, through a seccomp notification the test answers."""
    parent, child = socket.socketpair()
    calls: list[tuple[str, int]] = []  # (system call, its first argument) in order
    aborted: list[int] = []

    def decide(name: str, args: tuple[int, ...]) -> int | None:
        calls.append((name, args[0]))
        if name == "accept4" and not aborted:
            aborted.append(args[0])
            return errno.ECONNABORTED
        return None

    config = {
        "listen": ["127.0.0.1:0"],
        "stats_interval": "0s",
        "agent": {"listen": "127.0.0.1:0"},
    }
    traced = ",".join(seccomp_notify.names().values())  # accept4 and epoll's waits
    with parent, child:
        helper = ("-m", "tests.seccomp_notify", "--calls", traced, "--send-to")
        daemon = Daemon(
            write_config(tmp_path / "epolld.yaml", config),
            prefix=(sys.executable, *helper, str(child.fileno()), "--"),
            pass_fds=(child.fileno(),),
        )
        parent.settimeout(WAIT_S)
        _, [notify_fd], _, _ = socket.recv_fds(parent, 16, 1)
    supervisor = seccomp_notify.Supervisor(notify_fd, decide)
    try:
        agent_port = _port(daemon, "agent_listening")
        with connect(agent_port) as agent:  # the first connection the daemon sees
            assert recv_until_eof(agent).decode().startswith("up ready ")
        [fd] = aborted
        assert os.readlink(f"/proc/{daemon.pid}/fd/{fd}") == (
            f"socket:[{_listening_inode(agent_port)}]"
        )
        after = calls.index(("accept4", fd)) + 1
        assert calls[after] == ("accept4", fd), calls  # not back to epoll first
        assert not daemon.events("agent_accept_paused")
        assert not daemon.events("agent_accept_failed")
    finally:
        daemon.stop()
        supervisor.close()
    assert not daemon.bad_lines, daemon.bad_lines[:5]
