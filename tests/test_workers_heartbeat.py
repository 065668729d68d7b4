"""A worker's heartbeat stays cheap however many connections it holds: the totals, which
add up every open connection's bytes, come with one heartbeat of every few above
TOTALS_CONNECTIONS_PER_BEAT connections, and the supervisor keeps the last ones between
them. In-process, on a real listener with real loopback clients and a real socketpair."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from epolld.config import load_config
from epolld.core.counters import Counters
from epolld.listening import sockets
from epolld.service.echo import EchoService
from epolld.systemd import Notifier
from epolld.workers.link import Up
from epolld.workers.slot import Slot
from epolld.workers.sums import Sums
from epolld.workers.worker import TOTALS_CONNECTIONS_PER_BEAT, SupervisorLink

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
