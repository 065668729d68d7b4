"""A client's FIN reaches the daemon, and its FIN the client, however it arrives (issue 19).

Edge-triggered copying connections on a proxy_protocol listener missed a FIN that came
in the header's segment: the echo came back, the FIN never did, and the connection
counted against max_connections_per_ip until the idle timeout. Every combination that
could hide such a bug runs here: trigger x io x process model (one daemon each, many
clients against it), and per daemon every header kind x arrival pattern.

"One segment" uses TCP_CORK: the kernel holds the corked bytes until the shutdown(),
whose FIN it then puts on the same unsent segment (tcp_send_fin()); checked with a
packet socket on lo: one segment, flags FIN|PSH|ACK, the header and payload as data.
Without the cork, TCP_NODELAY or not, the FIN went in a segment of its own.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.epolld_process import Daemon, write_config
from tests.test_proxy_parser import inet4, v2
from tests.traffic import connect, recv_exactly

pytestmark = pytest.mark.slow

PLAIN_HOST = "127.0.0.2"  # the plain listener's address (two port 0s on one would collide)
FIN_WAIT_S = 5.0  # the most a FIN may take; the idle timeout is far longer
IDLE_TIMEOUT = "60s"
PAUSE_S = 0.05  # between segments that should arrive (and be read) apart

DAEMONS = {
    f"{trigger}-{io}-{procs}": {
        "trigger": trigger,
        "io": io,
        **({"workers": 2} if procs == "workers2" else {}),
    }
    for trigger in ("level", "edge")
    for io in ("copy", "splice")
    for procs in ("one", "workers2")
}
# Kinds of client: the header (a function of the case's client address) it sends first.
HEADERS: dict[str, Callable[[str], bytes]] = {
    "plain": lambda ip: b"",
    "v1": lambda ip: f"PROXY TCP4 {ip} 198.51.100.1 40001 7080\r\n".encode(),
    "v2": lambda ip: v2(addresses=inet4(ip, "198.51.100.1", 40002, 7080)),
    "v2-local": lambda ip: v2(command=0, family=0),  # served as the proxy itself
}
PATTERNS = ("one_segment", "split_header", "header_then_data_then_fin", "fin_later")
CASES = [(kind, pattern) for kind in HEADERS for pattern in PATTERNS]


class Served:
    """A daemon with a proxy_protocol listener on 127.0.0.1 and a plain one on PLAIN_HOST."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        # Told apart by host: workers each log their listeners, interleaved.
        hosts = [e["address"].rsplit(":", 1) for e in daemon.wait_for("listening", count=2)]
        port = {host: int(number) for host, number in hosts}
        self.proxy_port = port["127.0.0.1"]
        self.plain_port = port[PLAIN_HOST]

    def client(self, kind: str, source: str) -> socket.socket:
        """A connection from source to the listener that this kind of client uses."""
        if kind == "plain":
            return connect(self.plain_port, host=PLAIN_HOST, source=source)
        return connect(self.proxy_port, source=source)


@pytest.fixture(scope="module", params=list(DAEMONS))
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    """One daemon per configuration, for every case of the module."""
    config: dict[str, Any] = {
        "listen": [{"address": "127.0.0.1:0", "proxy_protocol": True}, f"{PLAIN_HOST}:0"],
        **DAEMONS[request.param],
        "limits": {"max_connections_per_ip": 1, "idle_timeout": IDLE_TIMEOUT},
        "stats_interval": "0s",
    }
    path = write_config(tmp_path_factory.mktemp(request.param) / "epolld.yaml", config)
    daemon = Daemon(path)
    try:
        if "workers" in config:
            daemon.wait_for("workers_ready")
        yield Served(daemon)
    finally:
        workers = {e["pid"] for e in daemon.events("worker_started")}
        daemon.stop()
        for pid in workers:  # in their own process group: not reached by Daemon.stop()
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert not daemon.bad_lines, daemon.bad_lines[:5]


def send_corked_with_fin(sock: socket.socket, data: bytes) -> None:
    """data and the FIN in one segment: corked, sent, then shut down (see the docstring)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)


def send_pattern(sock: socket.socket, pattern: str, header: bytes, payload: bytes) -> bytes:
    """Send header, payload and FIN in the pattern's segments; returns what came back
    before the FIN, when the pattern waits for the echo itself."""
    if pattern == "one_segment":
        send_corked_with_fin(sock, header + payload)
    elif pattern == "split_header":  # a proxy's header cut short, the rest with everything
        sock.sendall(header[:5])
        time.sleep(PAUSE_S)
        send_corked_with_fin(sock, header[5:] + payload)
    elif pattern == "header_then_data_then_fin":
        sock.sendall(header)
        time.sleep(PAUSE_S)
        sock.sendall(payload)
        time.sleep(PAUSE_S)
        sock.shutdown(socket.SHUT_WR)
    else:  # fin_later: the FIN alone, once the echo is back
        sock.sendall(header + payload)
        echoed = recv_exactly(sock, len(payload))
        sock.shutdown(socket.SHUT_WR)
        return echoed
    return b""


def recv_until_fin(sock: socket.socket) -> bytes:
    """Everything up to the daemon's FIN, which must come within FIN_WAIT_S."""
    deadline = time.monotonic() + FIN_WAIT_S
    got = bytearray()
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(1 << 16)
        except TimeoutError:
            raise AssertionError(
                f"no FIN within {FIN_WAIT_S}s (echoed {len(got)} bytes): the connection"
                f" would stay open until the {IDLE_TIMEOUT} idle timeout"
            ) from None
        if not chunk:
            return bytes(got)
        got += chunk


@pytest.mark.parametrize(("kind", "pattern"), CASES, ids=[f"{k}-{p}" for k, p in CASES])
def test_echo_then_fin_and_the_address_is_free_again(
    served: Served, kind: str, pattern: str
) -> None:
    """The echo is exact, the FIN comes promptly, and the next client from its address is served."""
    index = CASES.index((kind, pattern)) + 1
    source = f"127.0.0.{10 + index}"  # the address a plain or LOCAL client is counted under
    header = HEADERS[kind](f"192.0.2.{index}")  # v1, v2: the address it is counted under
    payload = f"{kind}/{pattern} ".encode() * 40
    with served.client(kind, source) as sock:
        echoed = send_pattern(sock, pattern, header, payload)
        echoed += recv_until_fin(sock)
    assert echoed == payload
    # max_connections_per_ip is 1: served only if the closed connection no longer counts
    # (with workers, in the worker that served it: the FIN above covers the others).
    with served.client(kind, source) as sock:
        sock.sendall(header + b"next client")
        assert recv_exactly(sock, 11, timeout=FIN_WAIT_S) == b"next client"
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_fin(sock) == b""
