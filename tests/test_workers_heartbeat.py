"""A worker's heartbeat stays cheap however many connections it holds: the totals, which
add up every open connection's bytes, come with one heartbeat of every few above
TOTALS_CONNECTIONS_PER_BEAT connections, and the supervisor keeps the last ones between
them; and a worker's turn dispatches at most EVENTS_PER_TURN events before its timers.
In-process, on a real listener with real loopback clients and real socketpairs."""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from epolld.config import load_config
from epolld.core.counters import Counters
from epolld.core.loop import Reactor
from epolld.listening import sockets
from epolld.service.echo import EchoService
from epolld.systemd import Notifier
from epolld.workers.link import Up
from epolld.workers.slot import Slot
from epolld.workers.sums import Sums
from epolld.workers.worker import EVENTS_PER_TURN, TOTALS_CONNECTIONS_PER_BEAT, SupervisorLink

CLIENTS = 2 * TOTALS_CONNECTIONS_PER_BEAT + 100  # the totals in one beat of three


@pytest.fixture
def service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[EchoService]:
    """An EchoService on 127.0.0.1:0, released after the test."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    path = tmp_path / "epolld.yaml"
    path.write_text(
        'listen: ["127.0.0.1:0"]\nbacklog: 4096\nlimits: {max_connections: 10000}\n'
        "logging: {level: warning, format: json}\nwatchdog: false\nstats_interval: 0s\n"
    )
    config = load_config(str(path))
    svc = EchoService(config, [sockets.bind(config.listen[0], config.backlog)], Notifier())
    yield svc
    svc._close_everything()


def _turn(svc: EchoService) -> None:
    svc.reactor.call_later(0.05, svc.reactor.stop)
    svc.reactor.run()


def test_totals_come_with_one_heartbeat_of_every_few(service: EchoService) -> None:
    """With 4,100 connections, heartbeats 1, 4, 7 carry the totals (with every open
    connection's bytes) and the others only the live values."""
    port = service.listeners[0].sock.getsockname()[1]
    clients: list[socket.socket] = []
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        for i in range(CLIENTS):
            clients.append(socket.create_connection(("127.0.0.1", port)))
            if i % 500 == 499:
                _turn(service)
        for _ in range(100):  # bounded: accepting takes a few turns
            _turn(service)
            if service.stats()["connections"] == CLIENTS:
                break
        assert service.stats()["connections"] == CLIENTS
        clients[0].sendall(b"abc")
        _turn(service)
        assert clients[0].recv(3) == b"abc"
        link = SupervisorLink(theirs, service._config)
        link.serve(service)
        beats = []
        for _ in range(7):
            link.heartbeat()
            beats.append(json.loads(ours.recv(1 << 20)))
        assert [b["kind"] for b in beats] == [Up.HEARTBEAT] * 7
        assert ["counters" in b for b in beats] == [True, False, False] * 2 + [True]
        assert all(b["stats"]["connections"] == CLIENTS for b in beats)
        assert beats[0]["counters"]["bytes_received"] == 3  # an open connection's bytes
    finally:
        ours.close()
        theirs.close()
        for client in clients:
            client.close()


def test_the_supervisor_keeps_the_last_totals_between_them() -> None:
    """A heartbeat without totals updates the live values and leaves the summed totals
    as the last one with totals had them."""
    slot = Slot(1, [])
    sums = Sums([slot], Counters(), 0.0)
    counted = Counters()
    counted.bytes_received = 3
    sums.report(slot, {"stats": {"connections": 5}, "counters": counted.to_dict()})
    sums.report(slot, {"stats": {"connections": 6}})
    assert slot.stats == {"connections": 6}
    assert sums.totals().bytes_received == 3


def test_a_worker_s_turn_dispatches_at_most_its_events_per_turn() -> None:
    """A reactor with max_events N runs its timers after N events, not after every ready
    one: a worker's heartbeat is not held back by thousands of busy connections."""
    reactor = Reactor()
    reactor.max_events = EVENTS_PER_TURN
    order: list[str] = []
    pairs = [socket.socketpair() for _ in range(3 * EVENTS_PER_TURN)]
    try:
        for a, b in pairs:
            reactor.add(_Echo(a, order))
            b.send(b"x")
        reactor.call_later(0.0, lambda: order.append("timer"))
        reactor.call_later(0.2, reactor.stop)
        time.sleep(0.01)  # the timer is due before the first poll
        reactor.run()
    finally:
        reactor.release()
        for _, b in pairs:
            b.close()
    assert order.index("timer") == EVENTS_PER_TURN, order[: EVENTS_PER_TURN + 2]
    assert order.count("event") == len(pairs)


class _Echo:
    """A handler that reads its byte and records the event."""

    def __init__(self, sock: socket.socket, order: list[str]) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.fd = sock.fileno()
        self.mask = select.EPOLLIN
        self.active_at = 0.0
        self._order = order

    def on_event(self, events: int) -> int:
        self.sock.recv(1)
        self._order.append("event")
        return select.EPOLLIN

    def close(self) -> None:
        self.sock.close()
