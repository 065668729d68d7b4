"""UdpEndpoint in-process on real UDP sockets over loopback, in both trigger modes.

`serve()` dispatches EPOLLIN to the endpoint as the reactor does, while the socket has
datagrams; the clock it hands the endpoint is a number the test may hold still (mocking
clocks is allowed), so rate limits give exact counts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import select
import socket
import time
from collections.abc import Callable, Iterator

import pytest

from epolld.config import ListenAddress, UdpConfig, parse_address
from epolld.listening import sockets as listeners
from epolld.udp.endpoint import DATAGRAMS_PER_EVENT, UdpEndpoint, UdpStats
from epolld.udp.ratelimit import UdpLimiter

WAIT_S = 10.0
IP_RECVERR = getattr(socket, "IP_RECVERR", 11)  # linux/in.h; Python 3.11 lacks the name
OPEN = UdpConfig(rate=0, byte_rate_bytes=0, total_rate=0, refuse_source_ports=(0, 19))


class TurnClock:
    """The reactor's part a UDP endpoint uses: `now` and reschedule()."""

    def __init__(self, now: float | None = None) -> None:
        self.frozen = now is not None
        self.now = time.monotonic() if now is None else now
        self.rescheduled: list[tuple[int, int]] = []

    def reschedule(self, item: tuple[int, int]) -> None:
        self.rescheduled.append(item)


@dataclasses.dataclass
class Server:
    endpoint: UdpEndpoint
    clock: TurnClock
    stats: UdpStats
    limiter: UdpLimiter

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.endpoint.sock.getsockname()[:2]
        return host, port

    def serve(self, received: int) -> None:
        """Dispatch events until the endpoint has received `received` datagrams in all."""
        poller = select.poll()
        poller.register(self.endpoint.fd, select.POLLIN)
        deadline = time.monotonic() + WAIT_S
        while self.stats.received < received:
            assert time.monotonic() < deadline, f"received {self.stats.received} of {received}"
            rescheduled, self.clock.rescheduled = self.clock.rescheduled, []
            if not self.clock.frozen:
                self.clock.now = time.monotonic()
            if rescheduled:
                for _, events in rescheduled:
                    assert self.endpoint.on_event(events) == self.endpoint.mask
            elif poller.poll(100):
                assert self.endpoint.on_event(select.EPOLLIN) == self.endpoint.mask


MakeServer = Callable[..., Server]


@pytest.fixture(params=["level", "edge"])
def edge(request: pytest.FixtureRequest) -> bool:
    return bool(request.param == "edge")


@pytest.fixture
def make_server(edge: bool) -> Iterator[MakeServer]:
    made: list[Server] = []

    def make(address: str = "udp:127.0.0.1:0", settings: UdpConfig = OPEN,
             now: float | None = None) -> Server:  # fmt: skip
        clock = TurnClock(now)
        limiter = UdpLimiter(settings, clock.now)
        stats = UdpStats()
        listener = listeners.bind(parse_address(address), 0)
        endpoint = UdpEndpoint(listener, clock, limiter, stats, edge=edge,
                               max_datagram=settings.max_datagram_bytes)  # fmt: skip
        server = Server(endpoint, clock, stats, limiter)
        made.append(server)
        return server

    yield make
    for server in made:
        server.endpoint.close()


def client(family: int = socket.AF_INET, bind: tuple[str, int] | None = None) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.settimeout(WAIT_S)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    if bind is not None:
        sock.bind(bind)
    return sock


def no_more(sock: socket.socket) -> list[bytes]:
    """Whatever is already queued on sock, without waiting."""
    left = []
    sock.setblocking(False)
    try:
        while True:
            left.append(sock.recv(65536))
    except BlockingIOError:
        return left
    finally:
        sock.settimeout(WAIT_S)


SIZES = [0, 1, 1472, 9000, 65507]


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_exact_echo_of_each_size(make_server: MakeServer, family: str) -> None:
    """0, 1, 1472, 9000 and 65507 bytes each come back once, as one datagram, unchanged."""
    server = make_server("udp:127.0.0.1:0" if family == "ipv4" else "udp:[::1]:0")
    with client(socket.AF_INET if family == "ipv4" else socket.AF_INET6) as c:
        payloads = [os.urandom(n) for n in SIZES]
        for payload in payloads:
            c.sendto(payload, server.address)
        server.serve(received=len(SIZES))
        replies = [c.recvfrom(65536) for _ in SIZES]
        assert [data for data, _ in replies] == payloads
        assert {source[:2] for _, source in replies} == {server.address}
        assert no_more(c) == []
    assert (server.stats.received, server.stats.echoed) == (5, 5)


@pytest.mark.parametrize("destination", ["127.0.0.1", "127.0.0.2"])
def test_wildcard_replies_from_the_address_it_was_sent_to(
    make_server: MakeServer, destination: str
) -> None:
    """On 0.0.0.0, a datagram sent to 127.0.0.2 is answered from 127.0.0.2, not 127.0.0.1."""
    server = make_server("udp:0.0.0.0:0")
    port = server.address[1]
    with client() as unconnected, client() as connected:
        unconnected.sendto(b"where from?", (destination, port))
        connected.connect((destination, port))  # drops datagrams from any other source
        connected.send(b"connected")
        server.serve(received=2)
        assert unconnected.recvfrom(100) == (b"where from?", (destination, port))
        assert connected.recv(100) == b"connected"


def test_ipv6_wildcard_replies_from_the_address_it_was_sent_to(make_server: MakeServer) -> None:
    """On [::], a datagram to ::1 is answered from ::1, and a connected client gets it."""
    server = make_server("udp:[::]:0")
    port = server.address[1]
    with client(socket.AF_INET6) as connected:
        connected.connect(("::1", port))
        connected.send(b"six")
        server.serve(received=1)
        assert connected.recv(100) == b"six"
        assert connected.getpeername()[:2] == ("::1", port)


def test_wildcard_ignores_broadcast(make_server: MakeServer) -> None:
    """A datagram to a broadcast address gets no reply (one broadcast must not get N replies)."""
    server = make_server("udp:0.0.0.0:0")
    port = server.address[1]
    with client() as c:
        c.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        c.sendto(b"to everyone", ("255.255.255.255", port))
        c.sendto(b"to you", ("127.0.0.1", port))
        server.serve(received=2)
        assert c.recv(100) == b"to you"
        assert no_more(c) == []
    assert server.stats.dropped["not_unicast"] == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="binding source port 19 needs root")
def test_source_port_19_gets_no_reply(make_server: MakeServer) -> None:
    """A datagram from chargen's port 19 is dropped and counted; another port is answered."""
    server = make_server()
    with client(bind=("127.0.0.1", 19)) as chargen, client() as other:
        chargen.sendto(b"loop?", server.address)
        other.sendto(b"fine", server.address)
        server.serve(received=2)
        assert other.recv(100) == b"fine"
        assert no_more(chargen) == []
    assert server.stats.dropped["source_port"] == 1


def test_datagram_from_ourselves_gets_no_reply(make_server: MakeServer) -> None:
    """A datagram whose source is the listener's own address and port is not echoed (a loop)."""
    server = make_server()
    server.endpoint.sock.sendto(b"me", server.address)
    with client() as c:
        c.sendto(b"you", server.address)
        server.serve(received=2)
        assert c.recv(100) == b"you"
    assert server.stats.dropped["source_port"] == 1
    assert server.stats.echoed == 1


def test_truncated_datagram_is_dropped_not_cut(make_server: MakeServer) -> None:
    """With max_datagram 100, 101 bytes are dropped as truncated and 100 bytes echoed."""
    server = make_server(settings=dataclasses.replace(OPEN, max_datagram_bytes=100))
    with client() as c:
        c.sendto(b"x" * 101, server.address)
        c.sendto(b"y" * 100, server.address)
        server.serve(received=2)
        assert c.recv(1000) == b"y" * 100
        assert no_more(c) == []
    assert server.stats.dropped["truncated"] == 1


def test_max_datagram_can_change(make_server: MakeServer) -> None:
    """set_max_datagram() applies to the next datagram (a reload)."""
    server = make_server(settings=dataclasses.replace(OPEN, max_datagram_bytes=100))
    server.endpoint.set_max_datagram(200)
    with client() as c:
        c.sendto(b"z" * 200, server.address)
        server.serve(received=1)
        assert c.recv(1000) == b"z" * 200


def test_burst_from_one_source_is_capped_and_another_source_answered(
    make_server: MakeServer,
) -> None:
    """10,000 datagrams at one instant from one source get `burst` replies; a second source
    is still answered."""
    settings = dataclasses.replace(OPEN, rate=100, burst=50, total_rate=1000)
    server = make_server(settings=settings, now=1000.0)
    # Buckets are per source address: the second source must be another address.
    with client() as flooder, client(bind=("127.0.0.2", 0)) as other:
        sent = 0
        for _ in range(10_000):
            flooder.sendto(b"f", server.address)
            sent += 1
            if sent % 100 == 0:  # keep within the server's receive buffer (~256 queued)
                server.serve(received=sent)
        other.sendto(b"o", server.address)
        server.serve(received=sent + 1)
        assert other.recv(10) == b"o"
        replies = no_more(flooder)
    assert len(replies) == 50
    assert server.stats.dropped["rate"] == 10_000 - 50
    assert server.stats.echoed == 51


def test_source_table_bound_with_many_source_addresses(make_server: MakeServer) -> None:
    """20,000 distinct 127.x.y.z sources leave at most `sources` entries in the table."""
    settings = dataclasses.replace(OPEN, rate=10, burst=1, sources=500)
    server = make_server(settings=settings)
    for i in range(20_000):
        source = f"127.{1 + (i >> 16)}.{(i >> 8) & 255}.{i & 255 or 1}"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
            c.bind((source, 0))
            c.sendto(b"s", server.address)
        if i % 200 == 199:
            server.serve(received=i + 1)
            assert len(server.limiter) <= 500
    server.serve(received=20_000)
    assert len(server.limiter) == 500


def test_icmp_errors_do_not_disturb_the_endpoint(make_server: MakeServer) -> None:
    """Port-unreachable errors for earlier replies (queued under IP_RECVERR) are read away:
    no EPOLLERR stays pending, and the socket keeps echoing."""
    server = make_server()
    sock = server.endpoint.sock
    sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
    with client(bind=("127.0.0.1", 0)) as gone:
        closed_port = gone.getsockname()[1]
    for _ in range(3):  # as a reply to a client that has gone would be
        with contextlib.suppress(ConnectionRefusedError):  # the previous one's error
            sock.sendto(b"nobody home", ("127.0.0.1", closed_port))
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    assert poller.poll(WAIT_S * 1000)[0][1] & select.POLLERR
    assert server.endpoint.on_event(select.EPOLLERR) == server.endpoint.mask
    assert poller.poll(0) == []  # nothing left: a level-triggered loop would not spin
    assert server.stats.icmp_errors >= 3
    with client() as c:
        c.sendto(b"still here", server.address)
        server.serve(received=1)
        assert c.recv(100) == b"still here"


def test_edge_budget_reschedules_the_rest(make_server: MakeServer, edge: bool) -> None:
    """More datagrams than one event's budget: edge mode reschedules, level mode waits for
    epoll; either way each is echoed once."""
    server = make_server()
    count = DATAGRAMS_PER_EVENT * 3 + 1
    with client() as c:
        for i in range(count):
            c.sendto(str(i).encode(), server.address)
        server.endpoint.on_event(select.EPOLLIN)
        assert server.stats.received == DATAGRAMS_PER_EVENT
        assert server.clock.rescheduled == ([(server.endpoint.fd, select.EPOLLIN)] if edge else [])
        server.serve(received=count)
        assert sorted(int(c.recv(10)) for _ in range(count)) == list(range(count))


def test_close_closes_the_socket(make_server: MakeServer) -> None:
    """close() closes the UDP socket: its port is free again."""
    server = make_server()
    address = server.address
    server.endpoint.close()
    again = listeners.bind(ListenAddress("ipv4", "127.0.0.1", address[1], transport="udp"), 0)
    again.sock.close()


def test_udp_and_tcp_share_a_port_number() -> None:
    """A UDP and a TCP listener bind the same port number on the same address."""
    tcp = listeners.bind(parse_address("127.0.0.1:0"), 16)
    try:
        port = tcp.sock.getsockname()[1]
        udp = listeners.bind(parse_address(f"udp:127.0.0.1:{port}"), 16)
        assert udp.name == f"udp:127.0.0.1:{port}"
        assert (udp.is_udp, udp.is_tcp, tcp.is_udp, tcp.is_tcp) == (True, False, False, True)
        udp.sock.close()
    finally:
        tcp.sock.close()


def test_udp_bind_conflict_is_a_bind_error() -> None:
    """A UDP port held by another socket fails with BindError naming the address."""
    from epolld.errors import BindError

    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    try:
        with pytest.raises(BindError, match=f"udp:127.0.0.1:{port}: address already in use"):
            listeners.bind(parse_address(f"udp:127.0.0.1:{port}"), 16)
    finally:
        holder.close()
