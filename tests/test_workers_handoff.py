"""The restart handoff with workers (issues 13 and 14), without systemd: SIGUSR2 to the
supervisor has every worker hand its connections over, the supervisor re-executes in
place, and each new worker takes over its predecessor's connections, every byte intact.

Real daemon, real clients on loopback; the clients check every byte themselves.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from epolld.tcp.connection import format_peer
from epolld.workers.round import HANDOFF_WAIT_S
from tests.epolld_process import WAIT_S, Daemon, write_config
from tests.test_handoff import STREAM_BYTES, Stream, TightLoop
from tests.traffic import connect, recv_exactly, recv_until_eof

pytestmark = pytest.mark.slow

CONNECTIONS_PER_ADDRESS = 40


def _config(workers: int, **more: Any) -> dict[str, Any]:
    return {
        "listen": ["127.0.0.1:0", "[::1]:0", "udp:127.0.0.1:0"],
        "workers": workers,
        "stats_interval": "0s",
        "logging": {"level": "info", "connections": True},
        **more,
    }


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        pids = {e["pid"] for e in daemon.events("worker_started")}
        daemon.stop()
        for pid in pids:  # in their own process group: not reached by Daemon.stop()
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert not daemon.bad_lines, daemon.bad_lines[:5]


def _supervisor(daemon: Daemon, event: str, count: int = 1) -> list[dict[str, Any]]:
    """The supervisor's own lines (a worker's name it)."""
    no_worker: dict[str, Any] = {"worker": None}
    return daemon.wait_for(event, count=count, **no_worker)


def _tcp_ports(daemon: Daemon, workers: int) -> tuple[int, int]:
    listening = daemon.wait_for("listening", count=3 * workers)
    tcp = {e["address"] for e in listening if not e["address"].startswith("udp:")}
    v4 = next(a for a in tcp if not a.startswith("["))
    v6 = next(a for a in tcp if a.startswith("["))
    return int(v4.rsplit(":", 1)[1]), int(v6.rsplit(":", 1)[1])


def _udp_port(daemon: Daemon) -> int:
    udp = next(e for e in daemon.events("listening") if e["address"].startswith("udp:"))
    return int(udp["address"].rsplit(":", 1)[1])


def _open_many(v4: int, v6: int) -> list[socket.socket]:
    socks = []
    for i in range(CONNECTIONS_PER_ADDRESS):
        for host, port in (("127.0.0.1", v4), ("::1", v6)):
            sock = connect(port, host)
            line = f"before {i}\n".encode()
            sock.sendall(line)
            assert recv_exactly(sock, len(line)) == line
            socks.append(sock)
    return socks


@pytest.mark.parametrize("workers", [2, 4])
def test_reexec_hands_every_workers_connections_over(
    tmp_path: Path, daemons: list[Daemon], workers: int
) -> None:
    """Connections spread over every worker, a stream in flight and a tight-loop client
    all go on through SIGUSR2: same supervisor PID, new workers, every worker's
    connections taken over by its slot's successor, nothing refused or reset."""
    config_path = write_config(tmp_path / "epolld.yaml", _config(workers))
    daemon = Daemon(config_path)
    daemons.append(daemon)
    _supervisor(daemon, "workers_ready")
    v4, v6 = _tcp_ports(daemon, workers)
    socks = _open_many(v4, v6)
    opened = daemon.events("connection_opened")
    holding = {e["worker"] for e in opened}
    assert holding == set(range(1, workers + 1))  # every worker has some to hand over
    payload = os.urandom(STREAM_BYTES)
    stream_sock = connect(v4)
    stream = Stream(stream_sock, payload)
    stream.start()
    got = bytearray(recv_exactly(stream_sock, 4096))
    tight = TightLoop(v4)
    tight.start()
    old_workers = {e["pid"] for e in daemon.events("worker_started")}

    daemon.signal(signal.SIGUSR2)
    started = _supervisor(daemon, "handoff_started")[0]
    complete = _supervisor(daemon, "handoff_complete")[0]

    for i, sock in enumerate(socks):
        line = f"after {i}\n".encode()
        sock.sendall(line)
        assert recv_exactly(sock, len(line)) == line
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == b""
        sock.close()
    got += recv_until_eof(stream_sock)
    stream.join(WAIT_S)
    assert not stream.errors
    assert bytes(got) == payload
    stream_sock.close()
    tight.done.set()
    tight.join(WAIT_S)
    assert not tight.failures, tight.failures[:1]
    assert tight.count > 0

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:  # UDP sockets travel too
        udp.settimeout(WAIT_S)
        udp.sendto(b"datagram", ("127.0.0.1", _udp_port(daemon)))
        assert udp.recv(100) == b"datagram"

    assert daemon.proc.poll() is None  # the same supervisor, re-executed
    assert started["workers"] == workers
    assert complete["workers"] == workers
    assert complete["old_pid"] == daemon.pid
    assert complete["connections"] >= len(socks) + 1  # the tight loop's may be among them
    handed = daemon.events("worker_handed_over")
    assert {e["worker"] for e in handed} == set(range(1, workers + 1))
    new_workers = {e["pid"] for e in daemon.events("worker_started")} - old_workers
    assert len(new_workers) == workers
    for pid in old_workers:  # every old worker exited (and was reaped)
        assert not Path(f"/proc/{pid}").exists()
    taken = [e for e in daemon.events("handoff_complete") if "worker" in e]
    assert sum(e["connections"] for e in taken) == complete["connections"]
    assert not daemon.events("handoff_failed")


def test_second_handoff_after_the_first(tmp_path: Path, daemons: list[Daemon]) -> None:
    """Handed over twice in a row: the connections taken over are handed on again."""
    daemon = Daemon(write_config(tmp_path / "epolld.yaml", _config(2)))
    daemons.append(daemon)
    _supervisor(daemon, "workers_ready")
    v4, v6 = _tcp_ports(daemon, 2)
    socks = _open_many(v4, v6)
    for round_ in (1, 2):
        daemon.signal(signal.SIGUSR2)
        assert _supervisor(daemon, "handoff_complete", count=round_)[-1]["connections"] == len(
            socks
        )
        for sock in socks:
            sock.sendall(b"round %d\n" % round_)
            assert recv_exactly(sock, 8) == b"round %d\n" % round_
    assert len(_supervisor(daemon, "supervisor_started", count=3)) == 3
    for sock in socks:
        sock.close()


def test_listen_changes_apply_and_the_worker_count_waits(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """listen, trigger and workers changed in the file before the handoff: the next
    supervisor keeps its workers (and says that this waits for a stop and start), binds
    the added address in every worker, closes the removed one (its connections stay), and
    applies the trigger mode; a shared Unix socket keeps its file and its connections;
    the totals carry on."""
    unix_path = tmp_path / "echo.sock"
    listen = ["127.0.0.1:0", "[::1]:0", f"unix:{unix_path}"]
    config_path = write_config(tmp_path / "epolld.yaml", _config(2, listen=listen))
    daemon = Daemon(config_path)
    daemons.append(daemon)
    _supervisor(daemon, "workers_ready")
    before_listening = daemon.wait_for("listening", count=6)
    tcp_addresses = {e["address"] for e in before_listening if not e["address"].startswith("unix:")}
    v4, v6 = (int(a.rsplit(":", 1)[1]) for a in sorted(tcp_addresses))  # "1…" before "["
    tcp = [connect(port, host) for port, host in [(v4, "127.0.0.1"), (v6, "::1")] * 5]
    local = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    local.settimeout(WAIT_S)
    local.connect(str(unix_path))
    for sock in [*tcp, local]:
        sock.sendall(b"before\n")
        assert recv_exactly(sock, 7) == b"before\n"
    daemon.signal(signal.SIGUSR1)
    accepted = _supervisor(daemon, "stats")[-1]["accepted"]
    assert accepted == 11

    moved = ["127.0.0.1:0", f"unix:{unix_path}", "udp:127.0.0.1:0"]  # [::1] out, UDP in
    write_config(config_path, {**_config(3, listen=moved), "trigger": "edge"})
    daemon.signal(signal.SIGUSR2)
    kept = _supervisor(daemon, "handoff_kept")[0]
    assert kept["settings"] == ["workers"]
    assert kept["workers"] == 2
    assert _supervisor(daemon, "handoff_complete")[0]["connections"] == 11
    closed = [e for e in daemon.events("listener_closed") if "worker" not in e]  # logged before
    assert [(e["address"], e["sockets"]) for e in closed] == [(f"[::1]:{v6}", 2)]
    assert _supervisor(daemon, "workers_ready", count=2)[-1]["workers"] == 2

    for sock in [*tcp, local]:  # the removed listener's connections too
        sock.sendall(b"after\n")
        assert recv_exactly(sock, 6) == b"after\n"
        sock.close()
    with pytest.raises(ConnectionRefusedError):
        connect(v6, "::1")
    assert unix_path.exists()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as fresh:
        fresh.settimeout(WAIT_S)
        fresh.connect(str(unix_path))
        fresh.sendall(b"fresh\n")
        assert recv_exactly(fresh, 6) == b"fresh\n"
    new_listening = daemon.wait_for("listening", count=12)[len(before_listening) :]
    assert {e["trigger"] for e in new_listening} == {"edge"}
    by_address: dict[str, set[int]] = {}
    for e in new_listening:
        by_address.setdefault(e["address"], set()).add(e["worker"])
    udp = next(a for a in by_address if a.startswith("udp:"))
    assert by_address == {f"127.0.0.1:{v4}": {1, 2}, f"unix:{unix_path}": {1, 2}, udp: {1, 2}}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as datagrams:
        datagrams.settimeout(WAIT_S)
        datagrams.sendto(b"new udp", ("127.0.0.1", int(udp.rsplit(":", 1)[1])))
        assert datagrams.recv(64) == b"new udp"
    before = len(_supervisor(daemon, "stats"))
    daemon.signal(signal.SIGUSR1)
    stats = _supervisor(daemon, "stats", count=before + 1)[-1]
    assert stats["accepted"] == accepted + 1  # carried on: not from zero, not twice


def test_broken_file_at_handoff_keeps_the_previous_configuration(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """A broken file at the handoff: config_invalid, the connections go on under new
    workers running the configuration the previous supervisor ran."""
    config_path = write_config(tmp_path / "epolld.yaml", _config(2))
    daemon = Daemon(config_path)
    daemons.append(daemon)
    _supervisor(daemon, "workers_ready")
    v4, _ = _tcp_ports(daemon, 2)
    socks = [connect(v4) for _ in range(8)]
    for sock in socks:
        sock.sendall(b"x")
        assert recv_exactly(sock, 1) == b"x"
    config_path.write_text("listen: [\n")
    daemon.signal(signal.SIGUSR2)
    daemon.wait_for("config_invalid")
    assert _supervisor(daemon, "handoff_complete")[0]["connections"] == 8
    for sock in socks:
        sock.sendall(b"y")
        assert recv_exactly(sock, 1) == b"y"
    # Mended, the file reaches every new worker on the next reload.
    write_config(config_path, {**_config(2), "stats_interval": "1h"})
    daemon.signal(signal.SIGHUP)
    _supervisor(daemon, "workers_reloaded")
    assert {e["worker"] for e in daemon.events("config_reloaded")} == {1, 2}
    for sock in socks:
        sock.sendall(b"z")
        assert recv_exactly(sock, 1) == b"z"
        sock.close()


def _two_workers_serving(
    tmp_path: Path, daemons: list[Daemon]
) -> tuple[Daemon, list[socket.socket]]:
    """epolld with 2 workers, and connections to both that have echoed once."""
    daemon = Daemon(write_config(tmp_path / "epolld.yaml", _config(2)))
    daemons.append(daemon)
    _supervisor(daemon, "workers_ready")
    return daemon, _open_many(*_tcp_ports(daemon, 2))


def test_stuck_worker_aborts_the_handoff_and_every_connection_is_taken_back(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """A worker that does not answer (SIGSTOP) stops the handoff from going ahead without
    it: the supervisor is not re-executed, the worker that handed over is replaced by one
    that takes its connections back, and so is the stuck one once it wakes and hands over
    late: every connection goes on."""
    daemon, socks = _two_workers_serving(tmp_path, daemons)
    by_peer = {e["peer"]: e["worker"] for e in daemon.events("connection_opened")}
    worker_of = {s: by_peer[format_peer(s.family, s.getsockname())] for s in socks}
    pids = {e["worker"]: e["pid"] for e in daemon.events("worker_started")}
    os.kill(pids[2], signal.SIGSTOP)
    try:
        daemon.signal(signal.SIGUSR2)
        failed = daemon.wait_for("handoff_failed", timeout=HANDOFF_WAIT_S + WAIT_S, worker=None)[0]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pids[2], signal.SIGCONT)
    assert failed["action"] == "serve on"
    handed = daemon.wait_for("worker_handed_over", count=2)
    assert [(e["worker"], e["late"]) for e in handed] == [(1, False), (2, True)]
    daemon.wait_for("worker_ready", count=4)  # both replaced
    assert not daemon.events("worker_unresponsive")  # the round's deadline, not the kill
    assert sorted(set(worker_of.values())) == [1, 2]
    for sock in socks:
        sock.sendall(b"taken back\n")
        assert recv_exactly(sock, 11) == b"taken back\n"
    assert len(daemon.events("supervisor_started")) == 1  # never re-executed
    for index in (1, 2):
        taken = [e for e in daemon.events("handoff_complete") if e.get("worker") == index]
        assert taken[0]["connections"] == sum(1 for w in worker_of.values() if w == index)
    for sock in socks:
        sock.close()


def test_stop_during_the_round_waits_for_it_then_drains_every_connection(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """SIGTERM while a worker has yet to answer the handoff: the stop waits for the round
    (a worker may be sending its connections up), the connections come back to new
    workers, and those drain them: what every client sent meanwhile is echoed before its
    FIN, then epolld exits 0."""
    daemon, socks = _two_workers_serving(tmp_path, daemons)
    pids = {e["worker"]: e["pid"] for e in daemon.events("worker_started")}
    os.kill(pids[2], signal.SIGSTOP)
    try:
        daemon.signal(signal.SIGUSR2)
        assert daemon.wait_for("worker_handed_over")[0]["worker"] == 1
        daemon.signal(signal.SIGTERM)
        _supervisor(daemon, "shutdown_deferred")
        for sock in socks:  # in flight (worker 1's) or queued for a stuck worker (2's)
            sock.sendall(b"drained\n")
    finally:
        os.kill(pids[2], signal.SIGCONT)
    assert [e["worker"] for e in daemon.wait_for("worker_handed_over", count=2)] == [1, 2]
    _supervisor(daemon, "handoff_cancelled")
    _supervisor(daemon, "shutdown_started")
    for sock in socks:
        assert recv_until_eof(sock) == b"drained\n"
        sock.close()
    assert len(daemon.events("supervisor_started")) == 1  # never re-executed
    assert daemon.wait() == 0
