"""Debian's HAProxy with `agent-check` on two epolld backends (issue 23): an operator's
drain (epolld --drain) sends a backend no new client while its open clients finish, a
restart handoff (SIGUSR2) never marks a backend down, and --undrain brings it back.

HAProxy asks the agent (epolld's agent.listen) every 300 ms, and checks health (an echo
line) every 2 s, marking a server down after three failed checks (its defaults).
Clients connect from 127.0.0.2; HAProxy sends a PROXY v2 header, so each epolld logs the
client's own address.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.epolld_process import WAIT_S, Daemon, write_config
from tests.haproxy import PROXY_SOURCE, Backend, HAProxy, missing_reason
from tests.traffic import connect, recv_until_eof, roundtrip

pytestmark = pytest.mark.slow

NAMES = ("e0", "e1")
CLIENT = "127.0.0.2"


class Pool:
    """Two epolld with an agent each, and the HAProxy in front of them."""

    def __init__(self, tmp_path: Path) -> None:
        self.daemons: dict[str, Daemon] = {}
        self.agent_ports: dict[str, int] = {}
        backends = []
        for name in NAMES:
            config = {
                "listen": [{"address": "127.0.0.1:0", "proxy_protocol": True}],
                "proxy": {"trusted": [f"{PROXY_SOURCE}/32"]},
                "logging": {"connections": True},
                "agent": {"listen": "127.0.0.1:0"},
                "control": {"socket": str(tmp_path / f"{name}.sock")},
                "stats_interval": "0s",
            }
            path = write_config(tmp_path / f"{name}.yaml", config)
            daemon = Daemon(path)
            self.daemons[name] = daemon
            address = daemon.wait_for("agent_listening")[0]["address"]
            self.agent_ports[name] = int(address.rsplit(":", 1)[1])
            # A restart binds the agent again: on the port this process got.
            config["agent"] = {"listen": address}
            write_config(path, config)
            # HAProxy's defaults (a check every 2 s, which may take as long; down after 3
            # failures): a re-exec of Python on a busy 2-core machine takes longer than
            # the other tests' 300 ms.
            timing = "inter 2s fall 3 rise 1"
            backends.append(
                Backend(name, daemon.port, agent_port=self.agent_ports[name], timing=timing)
            )
        self.haproxy = HAProxy(tmp_path, backends)

    def clients_of(self, name: str) -> set[str]:
        """The client addresses (not health checks) a backend has accepted."""
        return {
            e["peer"]
            for e in self.daemons[name].events("connection_opened")
            if e["peer"].startswith(CLIENT + ":")
        }

    def backend_of(self, sock: socket.socket) -> str:
        host, port = sock.getsockname()[:2]
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            for name in NAMES:
                if f"{host}:{port}" in self.clients_of(name):
                    return name
            time.sleep(0.02)
        raise AssertionError(f"no backend logged {host}:{port}")

    def operate(self, name: str, flag: str) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "epolld", "--config", str(self.daemons[name].config_path), flag],
            capture_output=True,
            text=True,
            timeout=WAIT_S,
            check=False,
        )
        assert done.returncode == 0, done.stderr

    def stop(self) -> None:
        self.haproxy.stop()
        for daemon in self.daemons.values():
            daemon.stop()
            assert not daemon.bad_lines, daemon.bad_lines[:5]


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Pool]:
    reason = missing_reason()
    if reason:
        pytest.skip(f"HAProxy test {reason}")
    made = Pool(tmp_path)
    try:
        made.haproxy.wait_status(dict.fromkeys(NAMES, "UP"))
        yield made
    finally:
        made.stop()


class StatusWatch(threading.Thread):
    """Every status HAProxy shows for the servers, polled until stopped."""

    def __init__(self, haproxy: HAProxy) -> None:
        super().__init__(daemon=True)
        self.haproxy = haproxy
        self.seen: dict[str, set[str]] = {name: set() for name in NAMES}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for name, status in self.haproxy.server_status().items():
                self.seen[name].add(status)
            time.sleep(0.02)


def test_drained_backend_gets_no_new_client_and_a_restart_never_marks_it_down(
    pool: Pool,
) -> None:
    """epolld --drain on e0: HAProxy shows "DRAIN (agent)" and sends every new client to e1 while
    e0's open clients go on echoing and finish; restarting both (SIGUSR2) never shows a
    server DOWN and e0 stays drained; epolld --undrain makes e0 UP and chosen again."""
    held: list[socket.socket] = []
    try:
        # The agent's weights move with the open connections: go on until both have some.
        while len({pool.backend_of(s) for s in held}) < 2 and len(held) < 20:
            held.append(connect(pool.haproxy.port, source=CLIENT))
            roundtrip(held[-1], b"before")
        on_e0 = [s for s in held if pool.backend_of(s) == "e0"]
        assert on_e0, "roundrobin put no client on e0"
        assert len(on_e0) < len(held), "roundrobin put no client on e1"
        pool.operate("e0", "--drain")
        pool.haproxy.wait_status({"e0": "DRAIN (agent)", "e1": "UP"})
        before = pool.clients_of("e0")
        newcomers = [connect(pool.haproxy.port, source=CLIENT) for _ in range(6)]
        for sock in newcomers:
            roundtrip(sock, b"new")
            assert pool.backend_of(sock) == "e1"
            sock.close()
        assert pool.clients_of("e0") == before
        for sock in on_e0:  # its open clients go on, and finish with a FIN
            roundtrip(sock, b"still served")
            sock.shutdown(socket.SHUT_WR)
            assert recv_until_eof(sock) == b""

        watch = StatusWatch(pool.haproxy)
        watch.start()
        try:
            for name in NAMES:
                daemon = pool.daemons[name]
                daemon.signal(signal.SIGUSR2)
                daemon.wait_for("handoff_complete")
                daemon.wait_for("agent_listening", count=2)
            time.sleep(6.5)  # three more health checks after the last restart
        finally:
            watch.done.set()
            watch.join(WAIT_S)
        # A check may fail while a process re-executes ("UP 1/3"), never three in a row.
        assert not any(s.startswith("DOWN") for seen in watch.seen.values() for s in seen)
        assert all(s.startswith("DRAIN") for s in watch.seen["e0"]), watch.seen
        assert all(s.startswith("UP") for s in watch.seen["e1"]), watch.seen
        for sock in held:
            if sock not in on_e0:  # e1's clients crossed its restart
                roundtrip(sock, b"after the restart")

        pool.operate("e0", "--undrain")
        pool.haproxy.wait_status({"e0": "UP", "e1": "UP"})
        later = [connect(pool.haproxy.port, source=CLIENT) for _ in range(4)]
        try:
            for sock in later:
                roundtrip(sock, b"later")
            assert "e0" in {pool.backend_of(sock) for sock in later}
        finally:
            for sock in later:
                sock.close()
    finally:
        for sock in held:
            sock.close()
