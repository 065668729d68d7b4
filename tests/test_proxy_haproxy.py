"""A real HAProxy (Debian 12's 2.6) in front of three epolld: addresses, limits, fail-over.

The backends differ on purpose: e0 level/copy with send-proxy-v2, e1 edge/splice with
send-proxy-v2, e2 edge/copy with send-proxy (version 1). Clients connect from 127.0.0.2
and 127.0.0.3; HAProxy reaches the backends from 127.0.0.50, the only trusted source.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.epolld_process import WAIT_S, Daemon, write_config
from tests.haproxy import PROXY_SOURCE, Backend, HAProxy, missing_reason
from tests.traffic import connect, pump, recv_exactly, recv_until_eof, roundtrip

pytestmark = pytest.mark.slow

MODES = {
    "e0": ({"trigger": "level", "io": "copy"}, "send-proxy-v2"),
    "e1": ({"trigger": "edge", "io": "splice"}, "send-proxy-v2"),
    "e2": ({"trigger": "edge", "io": "copy"}, "send-proxy"),
}
CLIENTS = ("127.0.0.2", "127.0.0.3")


@pytest.fixture(scope="module")
def haproxy_available() -> None:
    reason = missing_reason()
    if reason:
        pytest.skip(f"HAProxy test {reason}")


class Pool:
    """Three epolld backends and the HAProxy in front of them."""

    def __init__(self, tmp_path: Path, settings: dict[str, Any]) -> None:
        self.tmp_path = tmp_path
        self.settings = settings
        self.daemons: dict[str, Daemon] = {}
        self.ports: dict[str, int] = {}
        self.retired: list[Daemon] = []
        for name in MODES:
            self.start(name, port=0)
        self.haproxy = HAProxy(
            tmp_path, [Backend(name, self.ports[name], MODES[name][1]) for name in MODES]
        )

    def start(self, name: str, port: int) -> Daemon:
        config: dict[str, Any] = {
            "listen": [{"address": f"127.0.0.1:{port}", "proxy_protocol": True}],
            **MODES[name][0],
            "proxy": {"trusted": [f"{PROXY_SOURCE}/32"]},
            "logging": {"level": "debug", "connections": True},
            "shutdown_timeout": "10s",
        }
        config.update(self.settings)
        path = write_config(self.tmp_path / f"{name}-{len(self.retired)}.yaml", config)
        daemon = Daemon(path)
        self.daemons[name] = daemon
        self.ports[name] = daemon.port
        return daemon

    def client_logs(self, name: str) -> list[dict[str, Any]]:
        """connection_opened entries of one backend for clients (not health checks)."""
        return [
            e
            for e in self.daemons[name].events("connection_opened")
            if not e["peer"].startswith(PROXY_SOURCE + ":")
        ]

    def backend_of(self, sock: socket.socket) -> str:
        """The backend whose log names this client socket's own address as the peer."""
        host, port = sock.getsockname()[:2]
        deadline = time.monotonic() + WAIT_S  # the log line may still be on its way
        while time.monotonic() < deadline:
            for name, daemon in self.daemons.items():
                if any(e["peer"] == f"{host}:{port}" for e in daemon.events("connection_opened")):
                    return name
            time.sleep(0.02)
        raise AssertionError(f"no backend logged {host}:{port}")

    def stop(self) -> None:
        self.haproxy.stop()
        for daemon in [*self.daemons.values(), *self.retired]:
            daemon.stop()
            assert not daemon.bad_lines, daemon.bad_lines[:5]


@pytest.fixture
def pool_factory(haproxy_available: None, tmp_path: Path) -> Iterator[Any]:
    pools: list[Pool] = []

    def make(**settings: Any) -> Pool:
        state = tmp_path / f"pool{len(pools)}"
        state.mkdir()
        pool = Pool(state, settings)
        pools.append(pool)
        pool.haproxy.wait_status(dict.fromkeys(MODES, "UP"))
        return pool

    yield make
    for pool in pools:
        pool.stop()


def test_clients_are_echoed_and_logged_by_their_own_address(pool_factory: Any) -> None:
    """Through HAProxy every byte comes back, and the backends log the clients, not HAProxy;
    the health checks (v2 LOCAL, v1 headers) keep all three up."""
    pool = pool_factory()
    socks = [connect(pool.haproxy.port, source=CLIENTS[i % 2]) for i in range(12)]
    payloads = [os.urandom(256 << 10) for _ in socks]
    try:
        echoes = pump(list(zip(socks, payloads, strict=True)))
        assert echoes == payloads
        backends = {pool.backend_of(sock) for sock in socks}
    finally:
        for sock in socks:
            sock.close()
    assert backends == set(MODES)  # round robin reached all three
    for name in MODES:
        clients = pool.client_logs(name)
        assert {e["peer"].rsplit(":", 1)[0] for e in clients} <= set(CLIENTS)
        assert all(e["proxy"].startswith(PROXY_SOURCE + ":") for e in clients)
        checks = [e for e in pool.daemons[name].events("connection_opened") if e not in clients]
        assert checks, f"{name} logged no health check"
        assert not pool.daemons[name].events("proxy_header_refused")
    assert pool.haproxy.server_status() == dict.fromkeys(MODES, "UP")


def try_echo(sock: socket.socket, data: bytes = b"ping") -> bool:
    """Whether data comes back (True) or the connection is closed on it (False)."""
    sock.sendall(data)
    try:
        got = recv_exactly(sock, len(data), timeout=10)
    except (AssertionError, ConnectionResetError):
        return False
    assert got == data
    return True


def test_per_ip_limit_applies_to_each_real_client(pool_factory: Any) -> None:
    """With max_connections_per_ip 1, a client's second connection to a backend is refused,
    while other clients, all arriving from the same proxy address, are served."""
    pool = pool_factory(limits={"max_connections_per_ip": 1})
    held = [connect(pool.haproxy.port, source=CLIENTS[0]) for _ in range(4)]
    others = []
    try:
        # Round robin: e0, e1, e2, then e0 again, which already serves 127.0.0.2.
        results = [try_echo(sock) for sock in held]
        assert results == [True, True, True, False]
        others = [connect(pool.haproxy.port, source=CLIENTS[1]) for _ in range(3)]
        assert [try_echo(sock) for sock in others] == [True, True, True]
        refused = [
            e
            for daemon in pool.daemons.values()
            for e in daemon.events("connection_refused")
            if e["limit"] == "max_connections_per_ip"
        ]
        assert [e["peer_ip"] for e in refused] == [CLIENTS[0]]
    finally:
        for sock in held + others:
            sock.close()


def test_stopping_a_backend_fails_over_without_touching_the_others(pool_factory: Any) -> None:
    """SIGTERM to e1: its clients get their whole echo and a FIN, HAProxy marks it down and
    sends new clients elsewhere, the others' clients notice nothing; restarted on its port,
    e1 comes back into rotation."""
    pool = pool_factory()
    socks = [connect(pool.haproxy.port, source=CLIENTS[0]) for _ in range(6)]
    try:
        for sock in socks:
            roundtrip(sock, b"before")
        placed = {sock: pool.backend_of(sock) for sock in socks}
        victims = [s for s in socks if placed[s] == "e1"]
        survivors = [s for s in socks if placed[s] != "e1"]
        assert len(victims) == 2
        busy = victims[0]
        data = os.urandom(8 << 20)
        writer = threading.Thread(target=_send_all, args=(busy, data))
        writer.start()
        received = bytearray(recv_exactly(busy, 256 << 10))  # in flight both ways
        victim = pool.daemons["e1"]
        victim.signal(signal.SIGTERM)
        received += recv_until_eof(busy, timeout=30)  # a reset would raise here
        writer.join(30)
        assert recv_until_eof(victims[1], timeout=30) == b""  # the quiet one: a FIN
        for sock in victims:  # epolld lingers until its peers close (HAProxy follows ours)
            sock.close()
        assert victim.wait() == 0
        assert bytes(received) == data[: len(received)]
        closed = max(victim.events("connection_closed"), key=lambda e: e["bytes_out"])
        assert closed["bytes_in"] == closed["bytes_out"] == len(received) + len(b"before")

        pool.haproxy.wait_status({"e0": "UP", "e1": "DOWN", "e2": "UP"})
        for sock in survivors:
            roundtrip(sock, b"still here")
        newcomers = [connect(pool.haproxy.port, source=CLIENTS[1]) for _ in range(4)]
        for sock in newcomers:
            roundtrip(sock, b"new client")
        assert {pool.backend_of(sock) for sock in newcomers} == {"e0", "e2"}
        for name in ("e0", "e2"):
            assert not [
                e
                for e in pool.daemons[name].events("connection_closed")
                if not e["peer"].startswith(PROXY_SOURCE + ":")
            ], f"a client of {name} was closed"

        pool.retired.append(victim)
        pool.start("e1", port=pool.ports["e1"])
        pool.haproxy.wait_status(dict.fromkeys(MODES, "UP"))
        later = [connect(pool.haproxy.port, source=CLIENTS[1]) for _ in range(3)]
        for sock in later:
            roundtrip(sock, b"back in rotation")
        assert "e1" in {pool.backend_of(sock) for sock in later}
        for sock in survivors:
            roundtrip(sock, b"and still here")
        for sock in newcomers + later:
            sock.close()
    finally:
        for sock in socks:
            sock.close()


def _send_all(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # after the backend's FIN HAProxy may refuse more input; the reader decides
