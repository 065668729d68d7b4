"""Client-side traffic for tests: connect, pump data through many sockets, verify echoes."""

from __future__ import annotations

import contextlib
import selectors
import socket
import time
from collections.abc import Iterator

WAIT_S = 30.0


def connect(port: int, host: str = "127.0.0.1", source: str | None = None) -> socket.socket:
    sock = socket.create_connection(
        (host, port), timeout=WAIT_S, source_address=(source, 0) if source else None
    )
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


@contextlib.contextmanager
def connections(port: int, count: int) -> Iterator[list[socket.socket]]:
    """count connections to 127.0.0.1:port, all closed on exit."""
    socks = [connect(port) for _ in range(count)]
    try:
        yield socks
    finally:
        for sock in socks:
            sock.close()


def recv_exactly(sock: socket.socket, n: int, timeout: float = WAIT_S) -> bytes:
    sock.settimeout(timeout)
    chunks = bytearray()
    while len(chunks) < n:
        chunk = sock.recv(min(n - len(chunks), 1 << 20))
        if not chunk:
            raise AssertionError(f"EOF after {len(chunks)} of {n} bytes")
        chunks += chunk
    return bytes(chunks)


def recv_until_eof(sock: socket.socket, timeout: float = WAIT_S) -> bytes:
    sock.settimeout(timeout)
    chunks = bytearray()
    while chunk := sock.recv(1 << 20):
        chunks += chunk
    return bytes(chunks)


def echo_until_eof(
    port: int, payload: bytes, host: str = "127.0.0.1", timeout: float = WAIT_S
) -> bytes:
    """Connect, send payload, half-close, and return everything echoed back up to EOF."""
    with connect(port, host) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return recv_until_eof(sock, timeout)


def roundtrip(sock: socket.socket, data: bytes) -> None:
    sock.sendall(data)
    assert recv_exactly(sock, len(data)) == data


def pump(
    pairs: list[tuple[socket.socket, bytes]],
    *,
    chunk: int = 1 << 16,
    shut_write: bool = False,
    timeout: float = WAIT_S,
) -> list[bytes]:
    """Send each payload on its socket while reading echoes, all at once, without blocking.

    Returns what each socket received: the whole echo (or, with shut_write, up to EOF).
    """
    sel = selectors.DefaultSelector()
    sent = [0] * len(pairs)
    got = [bytearray() for _ in pairs]
    done = [False] * len(pairs)
    for i, (sock, _) in enumerate(pairs):
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, i)
    deadline = time.monotonic() + timeout
    try:
        while not all(done):
            if time.monotonic() > deadline:
                progress = [(sent[i], len(got[i]), len(p)) for i, (_, p) in enumerate(pairs)]
                raise AssertionError(f"pump timed out: (sent, received, size) {progress[:10]}")
            for key, mask in sel.select(1.0):
                i = key.data
                sock, payload = pairs[i]
                if mask & selectors.EVENT_WRITE and sent[i] < len(payload):
                    with contextlib.suppress(BlockingIOError):
                        sent[i] += sock.send(payload[sent[i] : sent[i] + chunk])
                    if sent[i] == len(payload):
                        if shut_write:
                            sock.shutdown(socket.SHUT_WR)
                        sel.modify(sock, selectors.EVENT_READ, i)
                if mask & selectors.EVENT_READ:
                    try:
                        data = sock.recv(1 << 20)
                    except BlockingIOError:
                        continue
                    got[i] += data
                    if (not data) or (not shut_write and len(got[i]) >= len(payload)):
                        done[i] = True
                        sel.unregister(sock)
    finally:
        sel.close()
        for sock, _ in pairs:
            sock.setblocking(True)
    return [bytes(g) for g in got]
