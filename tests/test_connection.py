"""Connection and SpliceConnection driven directly over a real TCP pair on 127.0.0.1."""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from epolld.connection import CLOSE, Connection
from epolld.splice import SpliceConnection, make_pipe
from tests.traffic import recv_until_eof

WAIT_S = 10.0


@pytest.fixture
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(client, server side) of one loopback TCP connection; the server side non-blocking."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.socket()
        # Small buffers on the way back, so that an echo the client does not read stays
        # pending at the server instead of vanishing into the kernel.
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(listener.getsockname())
        server, _ = listener.accept()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    server.setblocking(False)
    yield client, server
    client.close()
    server.close()


class Owner:
    """Records the connections that told it they closed, as the service would account."""

    def __init__(self) -> None:
        self.closed: list[Connection] = []

    def connection_closed(self, conn: Connection) -> None:
        self.closed.append(conn)


def make(kind: str, trigger: str, sock: socket.socket) -> Connection:
    settings = {
        "edge": trigger == "edge",
        "buf": memoryview(bytearray(64 * 1024)),
        "high_water": 1 << 20,
        "low_water": 1 << 18,
        "reschedule": lambda event: None,
        "now": 0.0,
        "owner": Owner(),
    }
    if kind == "splice":
        return SpliceConnection(sock, "peer", "127.0.0.1", pipe=make_pipe(64 * 1024), **settings)
    return Connection(sock, "peer", "127.0.0.1", **settings)


def drive(conn: Connection, done: Callable[[], bool]) -> int:
    """Run epoll for this one connection, as the loop does, until done() or CLOSE."""
    with select.epoll() as ep:
        ep.register(conn.fd, conn.mask)
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            if done():
                return conn.mask
            for _fd, ev in ep.poll(0.1):
                mask = conn.on_event(ev)
                if mask == CLOSE:
                    return CLOSE
                if mask != conn.mask:
                    ep.modify(conn.fd, mask)
                    conn.mask = mask
    raise AssertionError("drive() did not finish")


@pytest.mark.parametrize("trigger", ["level", "edge"])
@pytest.mark.parametrize("kind", ["copy", "splice"])
def test_eof_with_echo_pending_flushes_before_close(
    tcp_pair: tuple[socket.socket, socket.socket], kind: str, trigger: str
) -> None:
    """EOF from a peer that is not reading does not close the connection while echo is still
    pending; once the peer reads, it gets every byte, then EOF."""
    client, server = tcp_pair
    conn = make(kind, trigger, server)
    # More than the small socket buffers hold, less than the 64 KiB pipe: the EOF can be
    # read while part of the echo still waits at the server.
    data = os.urandom(48 * 1024)

    def writer() -> None:
        client.sendall(data)
        client.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=writer)
    thread.start()
    mask = drive(conn, lambda: conn.eof)
    thread.join(WAIT_S)
    assert mask != CLOSE, "closed at EOF with echo still pending"
    assert conn.pending() > 0  # the case under test: output waits when the EOF is read
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(recv_until_eof(client)))
    reader.start()
    assert drive(conn, lambda: False) == CLOSE
    conn.close()
    reader.join(WAIT_S)
    assert received == [data]
    assert conn.reason == "eof"
    assert conn.bytes_in == conn.bytes_out == len(data)
