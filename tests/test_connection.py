"""Connection and SpliceConnection driven directly over a real TCP pair on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from epolld.tcp.connection import (
    CLOSE,
    EDGE_BYTES_PER_EVENT,
    EDGE_READS_PER_EVENT,
    EPOLLIN,
    Connection,
    SharedSettings,
)
from epolld.tcp.splice import connection_class, make_pipe
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

    def splice_failed(self, conn: Connection, events: int) -> None:
        raise AssertionError("these tests always have a pipe")


def make(
    kind: str,
    trigger: str,
    sock: socket.socket,
    read_size: int = 64 * 1024,
    reschedule: Callable[[tuple[int, int]], None] = lambda event: None,
) -> Connection:
    shared = SharedSettings(
        high_water=1 << 20,
        low_water=1 << 18,
        reschedule=reschedule,
        owner=Owner(),
        make_pipe=lambda: make_pipe(64 * 1024),
    )
    cls = connection_class(edge=trigger == "edge", splice=kind == "splice")
    return cls(sock, "127.0.0.1", buf=memoryview(bytearray(read_size)), shared=shared, now=0.0)


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


@pytest.fixture
def deep_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(client, server side) with 4 MiB socket buffers: megabytes can wait in the kernel."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        client.connect(listener.getsockname())
        server, _ = listener.accept()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    server.setblocking(False)
    yield client, server
    client.close()
    server.close()


def fill(sock: socket.socket, limit: int) -> int:
    """Send up to limit bytes without blocking; returns how many the kernel took."""
    sock.setblocking(False)
    chunk = os.urandom(64 * 1024)
    total = 0
    try:
        while total < limit:
            total += sock.send(chunk)
    except BlockingIOError:
        pass
    return total


@pytest.mark.parametrize(
    ("kind", "read_size", "limit"),
    [
        # 16 reads of 256 KiB would be 4 MiB: the byte budget must stop it first.
        ("copy", 256 * 1024, EDGE_BYTES_PER_EVENT),
        # 64 KiB pipe: 16 pulls would be 1 MiB; the byte budget stops at 256 KiB.
        ("splice", 256 * 1024, EDGE_BYTES_PER_EVENT),
        # Small reads: the read budget (16) comes first.
        ("copy", 4 * 1024, EDGE_READS_PER_EVENT * 4 * 1024),
    ],
)
def test_edge_event_handles_at_most_the_budget(
    deep_pair: tuple[socket.socket, socket.socket], kind: str, read_size: int, limit: int
) -> None:
    """One edge-triggered event reads no more than its budget (bytes or reads) from a peer
    with megabytes queued, reschedules itself for the rest, and the rest still arrives."""
    client, server = deep_pair
    queued: list[tuple[int, int]] = []
    conn = make(kind, "edge", server, read_size=read_size, reschedule=queued.append)
    sent = fill(client, 4 << 20)
    assert sent > 2 * limit  # the case under test: far more waits than one event may take
    deadline = time.monotonic() + WAIT_S
    while conn.bytes_in == 0 and time.monotonic() < deadline:  # loopback delivery is async
        conn.on_event(EPOLLIN)
        queued.clear()
    first = conn.bytes_in
    conn.on_event(EPOLLIN)
    assert 0 < conn.bytes_in - first <= limit
    assert queued == [(conn.fd, EPOLLIN)]
    while conn.bytes_in < sent and time.monotonic() < deadline:
        queued.clear()
        conn.on_event(EPOLLIN)
        with contextlib.suppress(BlockingIOError):
            while client.recv(1 << 20):
                pass
    assert conn.bytes_in == sent


@pytest.mark.parametrize("trigger", ["level", "edge"])
def test_splice_with_small_segments_never_stalls(trigger: str) -> None:
    """A peer writing many small segments into a small pipe gets every byte back: a short
    splice(2) is limited by the pipe's slots (one per segment), not a sign the socket is
    drained, and a pipe out of slots must not stop reading for good (edge) or spin."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    server.setblocking(False)
    shared = SharedSettings(
        high_water=1 << 20,
        low_water=1 << 18,
        reschedule=lambda event: None,
        owner=Owner(),
        make_pipe=lambda: make_pipe(16 * 1024),  # 4 slots
    )
    cls = connection_class(edge=trigger == "edge", splice=True)
    conn = cls(server, "127.0.0.1", buf=memoryview(bytearray(16 * 1024)), shared=shared, now=0)
    data = os.urandom(400_000)
    received = bytearray()

    def writer() -> None:
        for i in range(0, len(data), 1000):
            client.sendall(data[i : i + 1000])

    def reader() -> None:
        while len(received) < len(data):
            chunk = client.recv(65536)
            if not chunk:
                return
            received.extend(chunk)

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    try:
        drive(conn, lambda: len(received) >= len(data))
    finally:
        for t in threads:
            t.join(WAIT_S)
        conn.close()
        client.close()
    assert bytes(received) == data
