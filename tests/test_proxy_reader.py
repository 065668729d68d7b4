"""HeaderReader on a real socketpair: it takes only the header off the socket."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from epolld.core.loop import CLOSE
from epolld.tcp.proxy import HeaderReader, ProxyHeader
from tests.test_proxy_parser import inet4, v2

MASK = 0x2001  # any mask: the reader hands it back while it waits


class Owner:
    """Records what the reader reports, as the service would receive it."""

    def __init__(self) -> None:
        self.headers: list[ProxyHeader] = []
        self.failures: list[tuple[str, str]] = []
        self.closed = 0
        self.rescheduled: list[tuple[int, int]] = []

    def header_read(self, reader: HeaderReader, header: ProxyHeader) -> int:
        self.headers.append(header)
        return MASK

    def header_failed(self, reader: HeaderReader, reason: str, detail: str) -> None:
        self.failures.append((reason, detail))

    def reader_closed(self, reader: HeaderReader) -> None:
        self.closed += 1


Pair = tuple[socket.socket, socket.socket, HeaderReader, Owner]


@pytest.fixture
def pair() -> Iterator[Pair]:
    client, server = socket.socketpair()
    server.setblocking(False)
    owner = Owner()
    reader = HeaderReader(
        server, "", "unix", mask=MASK, now=0.0, owner=owner, reschedule=owner.rescheduled.append
    )
    yield client, server, reader, owner
    client.close()
    server.close()


def test_payload_behind_the_header_stays_queued(pair: Pair) -> None:
    """Header and payload in one write: the header is parsed, the payload is still unread."""
    client, server, reader, owner = pair
    header = v2(addresses=inet4("192.0.2.1", "192.0.2.2", 1, 2))
    client.sendall(header + b"payload for the Connection")
    assert reader.on_event(0x1) == MASK
    assert owner.headers[0].source == ("192.0.2.1", 1)
    assert server.recv(100) == b"payload for the Connection"


def test_v1_line_read_by_peeking_past_its_end(pair: Pair) -> None:
    """A v1 read peeks beyond the CRLF, but takes no byte after it."""
    client, server, reader, owner = pair
    client.sendall(b"PROXY TCP4 192.0.2.9 192.0.2.2 5 6\r\n" + b"x" * 500)
    assert reader.on_event(0x1) == MASK
    assert owner.headers[0].source == ("192.0.2.9", 5)
    assert server.recv(1000) == b"x" * 500


def test_one_byte_at_a_time_waits(pair: Pair) -> None:
    """Each partial read leaves the reader waiting with its mask; the last completes it."""
    client, _, reader, owner = pair
    line = b"PROXY UNKNOWN\r\n"
    for byte in line[:-1]:
        client.sendall(bytes([byte]))
        assert reader.on_event(0x1) == MASK
    assert not owner.headers
    client.sendall(line[-1:])
    assert reader.on_event(0x1) == MASK
    assert owner.headers[0].is_local


def test_eof_before_the_header(pair: Pair) -> None:
    """A peer that closes mid-header is reported and the reader asks to be closed."""
    client, _, reader, owner = pair
    client.sendall(b"PROXY TCP4 1.2")
    client.shutdown(socket.SHUT_WR)
    assert reader.on_event(0x1) == CLOSE
    assert owner.failures == [("closed_before_header", "EOF")]


def test_bad_header_is_reported_with_its_reason(pair: Pair) -> None:
    """A client that is not a proxy is refused at its first byte."""
    client, _, reader, owner = pair
    client.sendall(b"GET / HTTP/1.1\r\n")
    assert reader.on_event(0x1) == CLOSE
    assert owner.failures[0][0] == "not_proxy_protocol"


def test_close_releases_the_socket_and_tells_the_owner(pair: Pair) -> None:
    """close() closes the socket, then reports it."""
    _, server, reader, owner = pair
    reader.close()
    assert server.fileno() == -1
    assert owner.closed == 1
