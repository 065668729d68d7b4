"""workers: N > 1: a supervisor and N worker processes on real sockets (issue 14)."""

from __future__ import annotations

import contextlib
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
from tests.traffic import connect, recv_until_eof, roundtrip

WORKER_COUNTS = [2, 4]


class Workers:
    """A supervisor under test, with what its log says about its workers."""

    def __init__(self, daemon: Daemon, count: int) -> None:
        self.daemon = daemon
        self.count = count

    def pids(self) -> dict[int, int]:
        """worker index -> pid of the latest process in that slot."""
        return {e["worker"]: e["pid"] for e in self.daemon.events("worker_started")}

    def stats(self) -> dict[str, Any]:
        """Fresh summed statistics: SIGUSR1, then the supervisor's stats line."""
        before = len(self.supervisor_events("stats"))
        self.daemon.signal(signal.SIGUSR1)
        supervisor_only: dict[str, Any] = {"worker": None}  # a worker's lines name it
        self.daemon.wait_for("stats", count=before + 1, **supervisor_only)
        return self.supervisor_events("stats")[-1]

    def supervisor_events(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.daemon.events(event) if "worker" not in e]

    def opened(self) -> int:
        """How many connection_opened lines so far: pass it to worker_of() as `after`."""
        return len(self.daemon.events("connection_opened"))

    def worker_of(self, sock: socket.socket, after: int = 0) -> int:
        """Which worker accepted sock (logging.connections names it): the newest
        connection_opened for its local port past the first `after` (ports are reused)."""
        port = sock.getsockname()[1]
        deadline = time.monotonic() + WAIT_S  # the log line may still be on its way
        while time.monotonic() < deadline:
            for e in reversed(self.daemon.events("connection_opened")[after:]):
                if e["peer"].endswith(f":{port}"):
                    return int(e["worker"])
            time.sleep(0.02)
        raise AssertionError(f"no connection_opened for local port {port}")


@pytest.fixture
def start_workers(tmp_path: Path) -> Iterator[Any]:
    started: list[Workers] = []

    def start(count: int, settings: dict[str, Any] | None = None) -> Workers:
        config: dict[str, Any] = {
            "listen": ["127.0.0.1:0"],
            "workers": count,
            "stats_interval": "0s",
            "logging": {"connections": True},
            **(settings or {}),
        }
        path = write_config(tmp_path / f"epolld-{len(started)}.yaml", config)
        workers = Workers(Daemon(path), count)
        started.append(workers)
        workers.daemon.wait_for("workers_ready")
        return workers

    yield start
    for workers in started:
        pids = workers.pids().values()
        workers.daemon.stop()
        for pid in pids:  # in their own process group: not reached by Daemon.stop()
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert not workers.daemon.bad_lines, workers.daemon.bad_lines[:5]


@pytest.mark.parametrize("count", WORKER_COUNTS)
def test_connections_spread_within_20_percent(start_workers: Any, count: int) -> None:
    """1,000 connections are shared by every worker, each within 20% of an equal share."""
    w = start_workers(count, {"logging": {"connections": False}})
    port = w.daemon.port
    for _ in range(1000):
        with connect(port) as sock:
            roundtrip(sock, b"x")
    stats = w.stats()
    accepted = {e["worker"]: e["accepted"] for e in stats["workers"]}
    assert stats["accepted"] == 1000
    assert sorted(accepted) == list(range(1, count + 1))
    share = 1000 / count
    assert all(abs(n - share) <= 0.2 * share for n in accepted.values()), accepted
    pids = {e["pid"] for e in stats["workers"]}
    assert len(pids) == count
    assert w.daemon.pid not in pids
    # Each worker's loop: its longest turn and the CPU of its deferred work, in ms.
    assert all(0 <= e["longest_turn_ms"] < 1000 for e in stats["workers"]), stats["workers"]
    assert all(0 <= e["longest_deferred_cpu_ms"] < 1000 for e in stats["workers"])
    assert all(e["slow_turns"] >= 0 for e in stats["workers"])


@pytest.mark.parametrize("count", WORKER_COUNTS)
def test_killed_worker_is_replaced_and_the_others_keep_echoing(
    start_workers: Any, count: int
) -> None:
    """SIGKILL of one worker: its connections go, every other connection keeps echoing,
    a new worker takes the slot, the log says how many connections went, and a client
    connecting in a tight loop meanwhile always connects and is served (but for the one
    conversation the killed worker may have held)."""
    w = start_workers(count)
    port = w.daemon.port
    socks = [connect(port) for _ in range(12 * count)]
    for sock in socks:
        roundtrip(sock, b"hello")
    owner = {sock: w.worker_of(sock) for sock in socks}
    victim = owner[socks[0]]
    held = sum(1 for v in owner.values() if v == victim)
    old_pid = w.pids()[victim]
    w.stats()  # the supervisor knows the counts as of each worker's last report

    failures: list[BaseException] = []  # connect() or a live worker failed us
    lost: list[BaseException] = []  # the one conversation the victim held at its death
    served = [0]
    stop = threading.Event()

    def tight_loop() -> None:
        for _ in range(2000):  # bounded; stops once the replacement served some
            if stop.is_set():
                return
            try:
                sock = connect(port)
            except OSError as e:
                failures.append(e)
                return
            try:
                roundtrip(sock, b"ping")
                served[0] += 1
            except (ConnectionResetError, AssertionError) as e:
                (failures if lost else lost).append(e)
            finally:
                sock.close()

    client = threading.Thread(target=tight_loop)
    client.start()
    try:
        os.kill(old_pid, signal.SIGKILL)
        exited = w.daemon.wait_for("worker_exited", worker=victim, pid=old_pid)[0]
        w.daemon.wait_for("worker_ready", count=2, worker=victim)
        served_then = served[0]
        while client.is_alive() and served[0] < served_then + 50:
            client.join(0.05)
    finally:
        stop.set()
        client.join(WAIT_S)
    assert not failures, failures
    assert exited["signal"] == "SIGKILL"
    assert held <= exited["connections"] <= held + 1  # + the tight loop's, if open then
    assert w.pids()[victim] != old_pid
    for sock, index in owner.items():
        if index != victim:
            roundtrip(sock, b"still here")
        else:
            with contextlib.suppress(ConnectionResetError):
                assert recv_until_eof(sock) == b""
        sock.close()
    # The new worker serves its slot.
    new_pid_served = False
    for _ in range(400):
        after = w.opened()
        with connect(port) as sock:
            roundtrip(sock, b"new")
            if w.worker_of(sock, after) == victim:
                new_pid_served = True
                break
    assert new_pid_served


@pytest.mark.parametrize("count", WORKER_COUNTS)
def test_reload_reaches_every_worker(start_workers: Any, count: int, tmp_path: Path) -> None:
    """SIGHUP: every worker applies the new configuration, then READY (workers_reloaded)."""
    w = start_workers(count, {"logging": {"connections": False}})
    config = w.daemon.config_path
    write_config(
        config,
        {"listen": ["127.0.0.1:0"], "workers": count, "stats_interval": "0s",
         "logging": {"connections": True}},
    )  # fmt: skip
    w.daemon.signal(signal.SIGHUP)
    w.daemon.wait_for("workers_reloaded", workers=count)
    reloaded = {e["worker"] for e in w.daemon.events("config_reloaded")}
    assert reloaded == set(range(1, count + 1))
    # The new setting is in force in every worker: each logs the connections it opens.
    port = w.daemon.port
    seen: set[int] = set()
    for _ in range(400):
        if len(seen) == count:
            break
        after = w.opened()
        with connect(port) as sock:
            roundtrip(sock, b"x")
            seen.add(w.worker_of(sock, after))
    assert seen == set(range(1, count + 1))


@pytest.mark.parametrize(
    "broken",
    [
        "listen: [127.0.0.1:0\n",  # not YAML
        "listen: ['127.0.0.1:0']\nworkers: 2\nlimits: {max_connections: 0}\n",  # invalid
        "listen: ['127.0.0.1:0', '192.0.2.1:0']\nworkers: 2\n",  # cannot be bound here
        "listen: ['127.0.0.1:0']\nworkers: 3\n",  # needs a stop and start
    ],
)
def test_broken_reload_leaves_every_worker_on_the_old_config(
    start_workers: Any, broken: str
) -> None:
    """A reload that fails validation, cannot be bound or needs a stop and start reaches no
    worker; all serve."""
    w = start_workers(2)
    w.daemon.config_path.write_text(broken)
    w.daemon.signal(signal.SIGHUP)
    failed = w.daemon.wait_for("config_reload_failed")[0]
    if "workers: 3" in broken:
        assert failed["error"].endswith(
            "workers: cannot change on reload with workers; stop and start epolld"
        )
    elif "192.0.2.1" in broken:  # no worker got a socket: none was bound
        assert failed["error"].endswith(
            "cannot listen on 192.0.2.1:0: no such address on this host"
        )
    w.stats()  # a round trip through every worker after the reload was handled
    assert not w.daemon.events("config_reloaded")
    with connect(w.daemon.port) as sock:
        roundtrip(sock, b"old config")


@pytest.mark.parametrize("count", WORKER_COUNTS)
def test_sigterm_drains_every_worker(start_workers: Any, count: int) -> None:
    """SIGTERM: every worker echoes what its clients sent, then FIN (not a reset), and the
    supervisor exits 0 once all have stopped."""
    w = start_workers(count)
    port = w.daemon.port
    socks = [connect(port) for _ in range(10 * count)]
    for sock in socks:
        roundtrip(sock, b"before")
    holders = {w.worker_of(s) for s in socks}
    assert holders == set(range(1, count + 1))
    for sock in socks:
        sock.sendall(b"at the stop")
    w.daemon.signal(signal.SIGTERM)
    for index in holders:
        w.daemon.wait_for("shutdown_started", worker=index)
    for sock in socks:
        assert recv_until_eof(sock) == b"at the stop"
        sock.close()
    assert w.daemon.wait() == 0
    assert len(w.daemon.events("worker_exited")) == count


def test_one_worker_is_the_single_process(tmp_path: Path) -> None:
    """workers: 1 (the default) runs no supervisor: one process, no child."""
    path = write_config(tmp_path / "epolld.yaml", {"listen": ["127.0.0.1:0"], "workers": 1})
    daemon = Daemon(path)
    try:
        daemon.wait_for("listening")
        with connect(daemon.port) as sock:
            roundtrip(sock, b"one")
        children = Path(f"/proc/{daemon.pid}/task/{daemon.pid}/children").read_text().split()
        assert children == []
        assert not daemon.events("supervisor_started")
        assert "worker" not in daemon.wait_for("listening")[0]
    finally:
        daemon.stop()


def test_unix_listener_is_shared_by_every_worker(start_workers: Any, tmp_path: Path) -> None:
    """A Unix socket is one socket served by all workers; it stays until the supervisor
    exits, whichever worker stops."""
    path = tmp_path / "echo.sock"
    w = start_workers(2, {"listen": [f"unix:{path}"]})
    seen: set[int] = set()
    for _ in range(200):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(WAIT_S)
            sock.connect(str(path))
            roundtrip(sock, b"u")
        if len(seen) == 2:
            break
        seen = {e["worker"] for e in w.daemon.events("connection_opened")}
    assert seen == {1, 2}
    os.kill(w.pids()[1], signal.SIGKILL)
    w.daemon.wait_for("worker_ready", count=2, worker=1)
    assert path.exists()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(WAIT_S)
        sock.connect(str(path))
        roundtrip(sock, b"after")
    w.daemon.signal(signal.SIGTERM)
    assert w.daemon.wait() == 0
    assert not path.exists()


def test_udp_has_a_socket_per_worker_and_counts_are_summed(start_workers: Any) -> None:
    """A UDP address gets one SO_REUSEPORT socket per worker: both workers listen on the
    same port, every datagram is echoed, and SIGUSR1's stats add up both workers' counts."""
    w = start_workers(2, {"listen": ["udp:127.0.0.1:0"]})
    listening = w.daemon.wait_for("listening", count=2)
    assert {e["worker"] for e in listening} == {1, 2}
    assert len({e["address"] for e in listening}) == 1
    port = int(listening[0]["address"].rsplit(":", 1)[1])
    for i in range(60):  # a source port each: the kernel hashes them over both sockets
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(WAIT_S)
            sock.sendto(b"datagram %d" % i, ("127.0.0.1", port))
            assert sock.recv(100) == b"datagram %d" % i
    stats = w.stats()
    assert stats["udp_received"] == 60
    assert stats["udp_echoed"] == 60
    assert stats["udp_listeners"] == 1
