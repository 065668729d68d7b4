"""UDP echo in batches (recvmmsg/sendmmsg): every per-datagram rule holds inside one batch.

Each test queues several datagrams first, then hands the endpoint ONE event: the
datagrams arrive in one recvmmsg, and the test checks that each was decided on its own
(refused ports, reply addresses, truncation, rate limits, a full send buffer) among the
others. test_udp.py covers the same rules one datagram at a time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import select
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from epolld.config import UdpConfig, parse_address
from epolld.listening import sockets as listeners
from epolld.udp.endpoint import UdpEndpoint, UdpStats
from epolld.udp.ratelimit import UdpLimiter
from tests.test_udp import OPEN, WAIT_S, MakeServer, Server, TurnClock, client, no_more

REPO = Path(__file__).resolve().parent.parent
# The shipped limits (rate 100, burst 200, total 10,000...), refusing port 19.
LIMITED = UdpConfig(refuse_source_ports=(0, 19))


@pytest.fixture(params=["level", "edge"])
def make_server(request: pytest.FixtureRequest) -> Iterator[MakeServer]:
    made: list[Server] = []

    def make(address: str = "udp:127.0.0.1:0", settings: UdpConfig = OPEN) -> Server:
        clock = TurnClock()
        limiter = UdpLimiter(settings, clock.now)
        stats = UdpStats()
        listener = listeners.bind(parse_address(address), 0)
        endpoint = UdpEndpoint(listener, clock, limiter, stats, edge=request.param == "edge",
                               max_datagram=settings.max_datagram_bytes)  # fmt: skip
        assert endpoint.batched, "recvmmsg/sendmmsg should be usable in the test process"
        server = Server(endpoint, clock, stats, limiter)
        made.append(server)
        return server

    yield make
    for server in made:
        server.endpoint.close()


def one_batch(server: Server, queued: int) -> None:
    """Dispatch ONE event for `queued` datagrams already waiting (loopback delivers them
    before sendto returns), and check that one recvmmsg took them all."""
    poller = select.poll()
    poller.register(server.endpoint.fd, select.POLLIN)
    assert poller.poll(WAIT_S * 1000), "nothing arrived"
    server.endpoint.on_event(select.EPOLLIN)
    assert server.stats.received == queued, "all of them should arrive in one recvmmsg"


@pytest.mark.skipif(os.geteuid() != 0, reason="binding source port 19 needs root")
@pytest.mark.parametrize("settings", [OPEN, LIMITED], ids=["limits-off", "limits-on"])
def test_refused_port_among_good_datagrams(make_server: MakeServer, settings: UdpConfig) -> None:
    """In one batch, the datagrams from chargen's port 19 are dropped and counted while the
    good ones around them are each answered, in order."""
    server = make_server(settings=settings)
    with client(bind=("127.0.0.1", 19)) as chargen, client() as good:
        for i in range(6):
            good.sendto(b"good %d" % i, server.address)
            chargen.sendto(b"loop? %d" % i, server.address)
        one_batch(server, 12)
        assert [good.recv(100) for _ in range(6)] == [b"good %d" % i for i in range(6)]
        assert no_more(good) == []
        assert no_more(chargen) == []
    assert server.stats.dropped["source_port"] == 6
    assert server.stats.echoed == 6


def test_wildcard_replies_from_each_datagrams_destination(make_server: MakeServer) -> None:
    """On 0.0.0.0, one batch holding datagrams sent to 127.0.0.1, .2 and .3 (and a broadcast
    and one from the listener itself) answers each from the address it was sent to."""
    server = make_server("udp:0.0.0.0:0")
    port = server.address[1]
    destinations = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    clients = [client() for _ in destinations]
    try:
        for c, destination in zip(clients, destinations, strict=True):
            c.connect((destination, port))  # drops a reply from any other source
        with client() as caster:
            caster.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            for round_ in range(3):
                for c in clients:
                    c.send(b"%s round %d" % (c.getpeername()[0].encode(), round_))
                caster.sendto(b"to everyone", ("255.255.255.255", port))
            server.endpoint.sock.sendto(b"from me", ("127.0.0.2", port))  # a loop
            one_batch(server, 3 * 4 + 1)
            assert no_more(caster) == []
        for c, destination in zip(clients, destinations, strict=True):
            assert [c.recv(100) for _ in range(3)] == [
                b"%s round %d" % (destination.encode(), r) for r in range(3)
            ]
            assert no_more(c) == []
    finally:
        for c in clients:
            c.close()
    assert server.stats.dropped["not_unicast"] == 3
    assert server.stats.dropped["source_port"] == 1
    assert server.stats.echoed == 9


def test_ipv6_batch_rules(make_server: MakeServer) -> None:
    """On [::1], one batch with good, truncated and self-sent datagrams answers only the
    good ones; on [::], the reply leaves from ::1 to a connected client."""
    settings = dataclasses.replace(OPEN, max_datagram_bytes=100)
    bound = make_server("udp:[::1]:0", settings=settings)
    with client(socket.AF_INET6) as c:
        for size in (10, 101, 100, 500, 1):
            c.sendto(b"6" * size, bound.address)
        bound.endpoint.sock.sendto(b"me", bound.address)
        one_batch(bound, 6)
        assert [len(c.recv(1000)) for _ in range(3)] == [10, 100, 1]
        assert no_more(c) == []
    assert bound.stats.dropped["truncated"] == 2
    assert bound.stats.dropped["source_port"] == 1

    wildcard = make_server("udp:[::]:0", settings=settings)
    with client(socket.AF_INET6) as c:
        c.connect(("::1", wildcard.address[1]))
        for size in (1, 200, 2):
            c.send(b"w" * size)
        one_batch(wildcard, 3)
        assert [c.recv(1000) for _ in range(2)] == [b"w", b"ww"]
    assert wildcard.stats.dropped["truncated"] == 1


@pytest.mark.parametrize("address", ["udp:127.0.0.1:0", "udp:0.0.0.0:0"])
def test_truncated_amid_good_datagrams(make_server: MakeServer, address: str) -> None:
    """With max_datagram 100, the longer datagrams of a batch are dropped and counted (each
    flagged MSG_TRUNC on its own), the others echoed whole."""
    server = make_server(address, settings=dataclasses.replace(OPEN, max_datagram_bytes=100))
    sizes = [50, 101, 100, 65507, 0, 99, 1000]
    with client() as c:
        for n, size in enumerate(sizes):
            c.sendto(bytes([n]) * size, ("127.0.0.1", server.address[1]))
        one_batch(server, len(sizes))
        assert [c.recv(65536) for _ in range(4)] == [b"\0" * 50, b"\2" * 100, b"", b"\5" * 99]
        assert no_more(c) == []
    assert server.stats.dropped["truncated"] == 3
    assert server.stats.echoed == 4


def test_rate_limit_counts_each_datagram_of_a_batch(make_server: MakeServer) -> None:
    """burst 5: of 20 datagrams from one source in one batch, 5 are answered; a second
    source in the same batch has a bucket of its own."""
    settings = dataclasses.replace(OPEN, rate=1, burst=5, total_rate=1000)
    server = make_server(settings=settings)
    server.clock.frozen = True
    with client() as one, client(bind=("127.0.0.2", 0)) as two:
        for i in range(20):
            one.sendto(b"%d" % i, server.address)
        two.sendto(b"two", server.address)
        one_batch(server, 21)
        assert [one.recv(10) for _ in range(5)] == [b"%d" % i for i in range(5)]
        assert no_more(one) == []
        assert two.recv(10) == b"two"
    assert server.stats.dropped["rate"] == 15
    assert len(server.limiter) == 2


@pytest.mark.skipif(os.geteuid() != 0, reason="a network namespace and tc need root")
def test_batch_that_fills_the_send_buffer_halfway() -> None:
    """A batch of 40 replies meets a send buffer with room for about 15 (a slow qdisc holds
    them): the first are sent, the rest dropped and counted at once, none queued or retried;
    exactly the sent ones reach the client, in order."""
    result = subprocess.run(
        ["unshare", "--net", sys.executable, str(REPO / "tests" / "udp_sendbuf_batch.py")],
        cwd=REPO, capture_output=True, text=True, timeout=WAIT_S * 3, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["batched"]
    assert report["received"] == 40
    assert 0 < report["echoed"] < 40  # halfway: some went, some did not fit
    assert report["send_buffer"] == 40 - report["echoed"]
    assert report["mask_is_epollin"]  # never waits for EPOLLOUT: nothing is queued
    assert report["replies"] == list(range(report["echoed"]))  # the first ones, in order
