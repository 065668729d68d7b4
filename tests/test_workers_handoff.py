"""The restart handoff with workers (issues 13 and 14), without systemd: SIGUSR2 to the
supervisor has every worker hand its connections over, the supervisor re-executes in
place, and each new worker takes over its predecessor's connections, every byte intact.

Real daemon, real clients on loopback; the clients check every byte themselves.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.epolld_process import WAIT_S, Daemon, write_config
from tests.test_handoff import STREAM_BYTES, Stream, TightLoop
from tests.traffic import connect, recv_exactly, recv_until_eof

pytestmark = pytest.mark.slow

CONNECTIONS_PER_ADDRESS = 40


def _config(workers: int, **more: Any) -> dict[str, Any]:
    return {
        "listen": ["127.0.0.1:0", "[::1]:0", "udp:127.0.0.1:0"],
        "workers": workers,
        "stats_interval": "0s",
        "logging": {"level": "info", "connections": True},
        **more,
    }


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        pids = {e["pid"] for e in daemon.events("worker_started")}
        daemon.stop()
        for pid in pids:  # in their own process group: not reached by Daemon.stop()
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert not daemon.bad_lines, daemon.bad_lines[:5]


def _supervisor(daemon: Daemon, event: str, count: int = 1) -> list[dict[str, Any]]:
    """The supervisor's own lines (a worker's name it)."""
    no_worker: dict[str, Any] = {"worker": None}
    return daemon.wait_for(event, count=count, **no_worker)


def _tcp_ports(daemon: Daemon, workers: int) -> tuple[int, int]:
    listening = daemon.wait_for("listening", count=3 * workers)
    tcp = {e["address"] for e in listening if not e["address"].startswith("udp:")}
    v4 = next(a for a in tcp if not a.startswith("["))
    v6 = next(a for a in tcp if a.startswith("["))
    return int(v4.rsplit(":", 1)[1]), int(v6.rsplit(":", 1)[1])


def _udp_port(daemon: Daemon) -> int:
    udp = next(e for e in daemon.events("listening") if e["address"].startswith("udp:"))
    return int(udp["address"].rsplit(":", 1)[1])


def _open_many(v4: int, v6: int) -> list[socket.socket]:
    socks = []
    for i in range(CONNECTIONS_PER_ADDRESS):
        for host, port in (("127.0.0.1", v4), ("::1", v6)):
            sock = connect(port, host)
            line = f"before {i}\n".encode()
            sock.sendall(line)
            assert recv_exactly(sock, len(line)) == line
            socks.append(sock)
    return socks


@pytest.mark.parametrize("workers", [2, 4])
def test_reexec_hands_every_workers_connections_over(
    tmp_path: Path, daemons: list[Daemon], workers: int
) -> None:
    """Connections spread over every worker, a stream in flight and a tight-loop client
    all go on through SIGUSR2: same supervisor PID, new workers, every worker's
    connections taken over by its slot's successor, nothing refused or reset."""
    config_path = write_config(tmp_path / "epolld.yaml", _config(workers))
    daemon = Daemon(config_path)
    daemons.append(daemon)
    _supervisor(daemon, "workers_ready")
    v4, v6 = _tcp_ports(daemon, workers)
    socks = _open_many(v4, v6)
    opened = daemon.events("connection_opened")
    holding = {e["worker"] for e in opened}
    assert holding == set(range(1, workers + 1))  # every worker has some to hand over
    payload = os.urandom(STREAM_BYTES)
    stream_sock = connect(v4)
    stream = Stream(stream_sock, payload)
    stream.start()
    got = bytearray(recv_exactly(stream_sock, 4096))
    tight = TightLoop(v4)
    tight.start()
    old_workers = {e["pid"] for e in daemon.events("worker_started")}

    daemon.signal(signal.SIGUSR2)
    started = _supervisor(daemon, "handoff_started")[0]
    complete = _supervisor(daemon, "handoff_complete")[0]

    for i, sock in enumerate(socks):
        line = f"after {i}\n".encode()
        sock.sendall(line)
        assert recv_exactly(sock, len(line)) == line
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == b""
        sock.close()
    got += recv_until_eof(stream_sock)
    stream.join(WAIT_S)
    assert not stream.errors
    assert bytes(got) == payload
    stream_sock.close()
    tight.done.set()
    tight.join(WAIT_S)
    assert not tight.failures, tight.failures[:1]
    assert tight.count > 0

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:  # UDP sockets travel too
        udp.settimeout(WAIT_S)
        udp.sendto(b"datagram", ("127.0.0.1", _udp_port(daemon)))
        assert udp.recv(100) == b"datagram"

    assert daemon.proc.poll() is None  # the same supervisor, re-executed
    assert started["workers"] == workers
    assert complete["workers"] == workers
    assert complete["old_pid"] == daemon.pid
    assert complete["connections"] >= len(socks) + 1  # the tight loop's may be among them
    handed = daemon.events("worker_handed_over")
    assert {e["worker"] for e in handed} == set(range(1, workers + 1))
    new_workers = {e["pid"] for e in daemon.events("worker_started")} - old_workers
    assert len(new_workers) == workers
    for pid in old_workers:  # every old worker exited (and was reaped)
        assert not Path(f"/proc/{pid}").exists()
    taken = [e for e in daemon.events("handoff_complete") if "worker" in e]
    assert sum(e["connections"] for e in taken) == complete["connections"]
    assert not daemon.events("handoff_failed")
