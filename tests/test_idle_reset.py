"""idle_timeout and a peer that never reads its echo: the close is a reset, not a FIN that
waits forever behind the echo the peer's full window refuses."""

from __future__ import annotations

import socket
import time

import pytest

from tests.conftest import StartDaemon
from tests.traffic import connect, recv_until_eof, roundtrip

pytestmark = pytest.mark.slow

TCP_ESTABLISHED = 1
TCP_CLOSE = 7  # what an RST leaves (a FIN would leave CLOSE_WAIT)
PEER_RCVBUF = 64 * 1024  # the peer's window: small, and fixed (no autotuning)
SENT = 512 * 1024  # fills that window many times over, and stays below high_water


def tcp_state(sock: socket.socket) -> int:
    return int(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0])


def test_idle_peer_that_never_reads_is_reset(start_daemon: StartDaemon) -> None:
    """Told at idle_timeout without reading: its state turns to CLOSE (an RST). The daemon
    had read everything (below high_water) and holds the echo the peer's full window
    refuses: a FIN would queue behind it, the peer stayed ESTABLISHED, and the kernel kept
    the closed socket and its echo in FIN-WAIT-1 for minutes (with 1,000 such peers the
    kernel's TCP memory stood at 1.5 GiB: issue 20, scenario 5)."""
    daemon = start_daemon(
        {
            "limits": {"idle_timeout": "1s"},
            "buffers": {"high_water": "4MiB", "low_water": "1MiB"},
        }
    )
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, PEER_RCVBUF)
        sock.settimeout(5.0)
        sock.connect(("127.0.0.1", daemon.port))
        sock.sendall(b"x" * SENT)  # and never read
        daemon.wait_for("connection_closed", reason="idle_timeout")
        deadline = time.monotonic() + 5.0
        while tcp_state(sock) == TCP_ESTABLISHED and time.monotonic() < deadline:
            time.sleep(0.05)
        assert tcp_state(sock) == TCP_CLOSE


def test_idle_peer_that_read_everything_gets_a_fin(start_daemon: StartDaemon) -> None:
    """A silent peer with nothing left to take is closed gracefully: EOF, not a reset."""
    daemon = start_daemon({"limits": {"idle_timeout": "500ms"}})
    with connect(daemon.port) as sock:
        roundtrip(sock, b"then silence")
        daemon.wait_for("connection_closed", reason="idle_timeout")
        assert recv_until_eof(sock, timeout=5) == b""
        assert tcp_state(sock) != TCP_CLOSE  # CLOSE_WAIT: it got a FIN
