"""Tiny threaded servers on real sockets for the epolld-client tests.

Each server listens on 127.0.0.1 port 0 (or a Unix socket path) and runs a
handler per connection in a thread. Handlers behave well or badly on purpose:
echo, corrupt one byte, close early, never reply, reset. Every socket is
closed and every thread joined when the `with` block ends.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
from collections.abc import Callable, Iterator

WAIT_S = 10.0  # bound on every blocking call in a handler
RECV_SIZE = 64 * 1024  # bytes per recv()

Handler = Callable[[socket.socket], None]


class ThreadedServer:
    """A listening socket whose connections each get handler(conn) in a thread."""

    def __init__(self, handler: Handler, unix_path: str | None = None) -> None:
        if unix_path is None:
            self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.listener.bind(("127.0.0.1", 0))
        else:
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.listener.bind(unix_path)
        self.listener.listen(16)
        self.port = int(self.listener.getsockname()[1]) if unix_path is None else 0
        self._handler = handler
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self.errors: list[BaseException] = []  # handler failures, for tests to inspect

    def __enter__(self) -> ThreadedServer:
        self._acceptor.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._acceptor.join(WAIT_S)
        for thread in self._threads:
            thread.join(WAIT_S)
        self.listener.close()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            # A short select() lets __exit__ stop the loop without closing the
            # listener under a blocked accept(), which is a race in CPython.
            readable, _, _ = select.select([self.listener], [], [], 0.05)
            if not readable:
                continue
            conn, _ = self.listener.accept()
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(WAIT_S)
            try:
                self._handler(conn)
            except OSError as exc:  # the client going away is fine; tests check errors
                self.errors.append(exc)


@contextlib.contextmanager
def serving(handler: Handler, unix_path: str | None = None) -> Iterator[ThreadedServer]:
    """Run a ThreadedServer for the duration of a `with` block."""
    with ThreadedServer(handler, unix_path) as server:
        yield server


def echo(conn: socket.socket) -> None:
    """Echo everything until the client closes: a correct RFC 862 server."""
    while data := conn.recv(RECV_SIZE):
        conn.sendall(data)


def corrupting(offset: int) -> Handler:
    """Return a handler that echoes but flips the byte at stream offset `offset`."""

    def handle(conn: socket.socket) -> None:
        position = 0
        while data := conn.recv(RECV_SIZE):
            if position <= offset < position + len(data):
                buffer = bytearray(data)
                buffer[offset - position] ^= 0xFF
                data = bytes(buffer)
            position += len(data)
            conn.sendall(data)

    return handle


def swapping_first_blocks(block: int) -> Handler:
    """Return a handler that echoes the stream's second `block` bytes before its first."""

    def handle(conn: socket.socket) -> None:
        head = bytearray()
        while len(head) < 2 * block and (data := conn.recv(2 * block - len(head))):
            head += data
        conn.sendall(head[block:] + head[:block])
        echo(conn)

    return handle


def closing_after(limit: int) -> Handler:
    """Return a handler that echoes `limit` bytes, then shuts down its sending side.

    It keeps reading afterwards, so the client sees a clean EOF rather than the
    reset a close() with unread data would cause.
    """

    def handle(conn: socket.socket) -> None:
        echoed = 0
        while echoed < limit and (data := conn.recv(min(RECV_SIZE, limit - echoed))):
            conn.sendall(data)
            echoed += len(data)
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(RECV_SIZE):
            pass

    return handle


def silent(conn: socket.socket) -> None:
    """Read everything and never reply, until the client closes."""
    while conn.recv(RECV_SIZE):
        pass


class Sink:
    """A handler that reads without replying and counts bytes, announcing the first ones."""

    def __init__(self) -> None:
        self.received = 0
        self.first_bytes = threading.Event()

    def __call__(self, conn: socket.socket) -> None:
        while data := conn.recv(RECV_SIZE):
            self.received += len(data)
            self.first_bytes.set()


def doubling(conn: socket.socket) -> None:
    """Echo every chunk twice."""
    while data := conn.recv(RECV_SIZE):
        conn.sendall(data + data)


def resetting(conn: socket.socket) -> None:
    """Wait for the first bytes, then close with SO_LINGER 0 so the kernel sends RST."""
    conn.recv(RECV_SIZE)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
