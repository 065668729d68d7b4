"""The echo service in-process, on a real listener and real loopback clients."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from epolld.config import load_config
from epolld.listening import sockets
from epolld.service import drain
from epolld.service.drain import IDLE_CLOSES_PER_TURN
from epolld.service.echo import EchoService
from epolld.systemd import Notifier

CLIENTS = 2 * IDLE_CLOSES_PER_TURN + 100  # three batches


@pytest.fixture
def service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[EchoService]:
    """An EchoService on 127.0.0.1:0 with a short idle timeout, released after the test."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    path = tmp_path / "epolld.yaml"
    path.write_text(
        'listen: ["127.0.0.1:0"]\nbacklog: 4096\nlimits: {idle_timeout: 1s}\n'
        "logging: {level: warning, format: json}\nwatchdog: false\nstats_interval: 0s\n"
    )
    config = load_config(str(path))
    svc = EchoService(config, [sockets.bind(config.listen[0], config.backlog)], Notifier())
    yield svc
    svc._close_everything()


def turn(svc: EchoService) -> None:
    """Run one short stretch of the loop: a 50 ms timer stops it."""
    svc.reactor.call_later(0.05, svc.reactor.stop)
    svc.reactor.run()


@pytest.mark.parametrize("budget_s", [drain.IDLE_CLOSE_CPU_S, 0.0])
def test_idle_expiry_closes_in_batches_and_all_eventually(
    service: EchoService, monkeypatch: pytest.MonkeyPatch, budget_s: float
) -> None:
    """When many connections expire at once, one sweep closes at most IDLE_CLOSES_PER_TURN
    of them, and stops once they took IDLE_CLOSE_CPU_S (with none at all: after one), and
    leaves the loop; the rest close on the following turns."""
    monkeypatch.setattr(drain, "IDLE_CLOSE_CPU_S", budget_s)
    [listener] = service.listeners
    port = listener.sock.getsockname()[1]
    clients = []
    try:
        for _ in range(CLIENTS):
            clients.append(socket.create_connection(("127.0.0.1", port)))
        for _ in range(100):  # bounded: accepting takes a few turns
            turn(service)
            if service.stats()["connections"] == CLIENTS:
                break
        assert service.stats()["connections"] == CLIENTS
        time.sleep(1.3)  # every connection is now past its 1 s idle deadline
        service.reactor.now = time.monotonic()
        service.drain.sweep_idle()
        closed = CLIENTS - service.stats()["connections"]
        assert (closed == 1) if budget_s == 0 else (1 <= closed <= IDLE_CLOSES_PER_TURN)
        for _ in range(100):
            turn(service)
            if not service.stats()["connections"]:
                break
        assert service.stats()["connections"] == 0
        for client in clients[:10]:
            client.settimeout(5)
            assert client.recv(1) == b""  # each got a FIN
    finally:
        for client in clients:
            client.close()
