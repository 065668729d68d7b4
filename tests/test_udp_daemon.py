"""UDP echo through the real daemon (`python -m epolld` as a subprocess) on loopback.

Each test reads the bound UDP port from the `listening` log line (the config asks for
port 0) and the counters from the `stats` line that SIGUSR1 triggers.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import StartDaemon
from tests.epolld_process import WAIT_S, Daemon, write_config
from tests.test_daemon_mode import Daemons, _epolld_settings, _logged
from tests.test_daemon_mode import daemons as daemons  # the fixture

UDP_MODES = {"level": {"trigger": "level"}, "edge": {"trigger": "edge"}}


@pytest.fixture(params=list(UDP_MODES))
def mode(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Both trigger modes (io: splice does not apply to UDP; test_udp_echo covers it)."""
    return dict(UDP_MODES[request.param])


def udp_addresses(daemon: Daemon) -> list[tuple[str, int]]:
    """(host, port) of each UDP listener, from the daemon's `listening` lines."""
    found = []
    for entry in daemon.events("listening"):
        address = entry["address"]
        if address.startswith("udp:"):
            host, _, port = address[4:].rpartition(":")
            found.append((host.strip("[]"), int(port)))
    return found


def stats(daemon: Daemon) -> dict[str, Any]:
    """The counters of a fresh `stats` line (SIGUSR1)."""
    count = len(daemon.events("stats")) + 1
    daemon.signal(signal.SIGUSR1)
    return daemon.wait_for("stats", count=count)[-1]


def client(family: int = socket.AF_INET, bind: tuple[str, int] | None = None) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.settimeout(WAIT_S)
    if bind is not None:
        sock.bind(bind)
    return sock


def drain(sock: socket.socket) -> list[bytes]:
    """What is queued on sock now, without waiting."""
    got = []
    sock.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        while True:
            got.append(sock.recv(65536))
    sock.settimeout(WAIT_S)
    return got


def ask_until_answered(sock: socket.socket, payload: bytes, address: tuple[str, int]) -> int:
    """Send payload until it comes back (the kernel drops datagrams while the daemon's
    receive queue is full of a flood); returns the number of tries."""
    sock.settimeout(0.5)
    try:
        for tries in range(1, int(WAIT_S / 0.5) + 1):
            sock.sendto(payload, address)
            with contextlib.suppress(TimeoutError):
                while sock.recv(65536) != payload:
                    pass
                return tries
        raise AssertionError(f"no answer to {payload!r} from {address}")
    finally:
        sock.settimeout(WAIT_S)


def udp_config(listen: list[str], **udp: Any) -> dict[str, Any]:
    return {"listen": listen, "udp": udp} if udp else {"listen": listen}


@pytest.mark.parametrize("io", ["copy", "splice"])
def test_exact_echo_over_ipv4_and_ipv6(start_daemon: StartDaemon, io: str) -> None:
    """0, 1, 1472, 9000 and 65507 bytes come back once, unchanged, over IPv4 and IPv6."""
    daemon = start_daemon({**udp_config(["udp:127.0.0.1:0", "udp:[::1]:0"]), "io": io})
    daemon.wait_for("listening", count=2)
    # splice(2) needs a stream: with io: splice, UDP listeners still copy, and say so.
    assert [e["io"] for e in daemon.events("listening")] == ["copy", "copy"]
    for (host, port), family in zip(udp_addresses(daemon), (socket.AF_INET, socket.AF_INET6),
                                    strict=True):  # fmt: skip
        with client(family) as c:
            c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            c.connect((host, port))
            for size in (0, 1, 1472, 9000, 65507):
                payload = os.urandom(size)
                c.send(payload)
                assert c.recv(65536) == payload
    counters = stats(daemon)
    assert (counters["udp_received"], counters["udp_echoed"], counters["udp_dropped"]) == (
        10,
        10,
        0,
    )


def test_wildcard_listener_answers_from_the_destination(start_daemon: StartDaemon) -> None:
    """On 0.0.0.0 and [::], each client gets its reply from the address it sent to, so a
    connected client (which accepts only that peer) gets it."""
    daemon = start_daemon(udp_config(["udp:0.0.0.0:0", "udp:[::]:0"]))
    daemon.wait_for("listening", count=2)
    (_, port4), (_, port6) = udp_addresses(daemon)
    for family, host, port in [(socket.AF_INET, "127.0.0.1", port4),
                               (socket.AF_INET, "127.0.0.2", port4),
                               (socket.AF_INET6, "::1", port6)]:  # fmt: skip
        with client(family) as unconnected:
            unconnected.sendto(host.encode(), (host, port))
            data, source = unconnected.recvfrom(100)
            assert (data, source[:2]) == (host.encode(), (host, port))
        with client(family) as connected:
            connected.connect((host, port))
            connected.send(b"connected")
            assert connected.recv(100) == b"connected"


@pytest.mark.skipif(os.geteuid() != 0, reason="binding source port 19 needs root")
def test_datagram_from_chargen_port_gets_no_reply(start_daemon: StartDaemon) -> None:
    """A datagram from source port 19 is dropped and counted; the next client is answered."""
    daemon = start_daemon(udp_config(["udp:127.0.0.1:0"]))
    (address,) = udp_addresses(daemon)
    with client(bind=("127.0.0.1", 19)) as chargen, client() as other:
        chargen.sendto(b"loop", address)
        other.sendto(b"ok", address)
        assert other.recv(10) == b"ok"  # sent after, so the first was handled already
        assert drain(chargen) == []
    assert stats(daemon)["udp_dropped_source_port"] == 1


def test_truncated_datagram_is_not_echoed(start_daemon: StartDaemon) -> None:
    """Over max_datagram, a datagram is dropped and counted as truncated, never cut short."""
    daemon = start_daemon(udp_config(["udp:127.0.0.1:0"], max_datagram=1000))
    (address,) = udp_addresses(daemon)
    with client() as c:
        c.sendto(b"a" * 1001, address)
        c.sendto(b"b" * 1000, address)
        assert c.recv(2000) == b"b" * 1000
        assert drain(c) == []
    assert stats(daemon)["udp_dropped_truncated"] == 1


def test_burst_from_one_source_is_rate_limited(start_daemon: StartDaemon) -> None:
    """10,000 datagrams from one source get at most rate x seconds + burst replies, logged
    once; a second source is still answered."""
    daemon = start_daemon(udp_config(["udp:127.0.0.1:0"], rate=100, burst=50))
    (address,) = udp_addresses(daemon)
    with client() as flooder, client(bind=("127.0.0.2", 0)) as other:
        flooder.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        started = time.monotonic()
        for _ in range(10_000):
            flooder.sendto(b"x" * 32, address)
        tries = ask_until_answered(other, b"still answered", address)
        elapsed = time.monotonic() - started
        replies = len(drain(flooder))
    assert 50 <= replies <= 100 * elapsed + 50
    counters = stats(daemon)
    assert counters["udp_dropped_rate"] > 0
    # Tries the kernel dropped (the flood filled the queue) never reached the daemon.
    assert replies + 1 <= counters["udp_echoed"] <= replies + tries
    (warning,) = daemon.events("udp_rate_limited")
    assert (warning["source"], warning["reason"]) == ("127.0.0.1", "rate")


def test_many_sources_leave_memory_bounded(start_daemon: StartDaemon) -> None:
    """50,000 distinct 127.x.y.z sources keep at most `sources` in the table, and the
    daemon's memory does not grow with them."""
    daemon = start_daemon(udp_config(["udp:0.0.0.0:0"], sources=1000, total_rate=0))
    (_, port) = udp_addresses(daemon)[0]
    rss_before = daemon.rss_bytes()
    for batch in range(250):
        clients = []
        for i in range(200):
            n = batch * 200 + i
            source = f"127.{1 + (n >> 16)}.{(n >> 8) & 255}.{(n & 255) or 1}"
            c = client(bind=(source, 0))
            c.sendto(b"s", ("127.0.0.1", port))
            clients.append(c)
        for c in clients:
            assert c.recv(10) == b"s"
            c.close()
    counters = stats(daemon)
    assert counters["udp_echoed"] == 50_000
    assert counters["udp_sources"] == 1000
    assert daemon.rss_bytes() - rss_before < 4 * 1024 * 1024  # 50,000 entries: ~15 MiB


def test_flood_does_not_spin_or_grow(start_daemon: StartDaemon) -> None:
    """A bounded flood of 100,000 datagrams that no client reads: memory stays bounded,
    the daemon is idle again once it stops, and it still answers; every datagram it
    received is accounted for."""
    daemon = start_daemon(udp_config(["udp:127.0.0.1:0"], total_rate=1000))
    (address,) = udp_addresses(daemon)
    rss_before = daemon.rss_bytes()
    with client() as flooder:
        flooder.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # replies are lost
        for i in range(100_000):
            flooder.sendto(i.to_bytes(4, "big") * 64, address)
    with client(bind=("127.0.0.3", 0)) as probe:
        ask_until_answered(probe, b"after", address)
    cpu_before = daemon.cpu_seconds()
    time.sleep(1.0)  # idle: a spinning loop would burn about a second of CPU here
    assert daemon.cpu_seconds() - cpu_before < 0.3
    counters = stats(daemon)
    dropped = sum(v for k, v in counters.items() if k.startswith("udp_dropped_"))
    assert counters["udp_received"] == counters["udp_echoed"] + dropped
    assert counters["udp_dropped"] == dropped
    assert counters["udp_received"] > 1000
    assert daemon.rss_bytes() - rss_before < 4 * 1024 * 1024


def test_reload_adds_keeps_and_removes_udp_listeners(start_daemon: StartDaemon) -> None:
    """A reload adds a UDP listener on the TCP listener's port number, keeps an unchanged
    one on its socket, applies new limits at once, and a later reload removes it."""
    daemon = start_daemon(udp_config(["127.0.0.1:0", "udp:127.0.0.1:0"]))
    daemon.wait_for("listening", count=2)
    tcp_port = daemon.port
    (kept,) = udp_addresses(daemon)
    kept_fd = next(e["fd"] for e in daemon.events("listening") if e["address"].startswith("udp"))
    with client() as c:
        c.sendto(b"before", kept)
        assert c.recv(10) == b"before"
        source_port = c.getsockname()[1]
        write_config(daemon.config_path, {
            # The same entries are kept (a port-0 entry stays "udp:127.0.0.1:0").
            "listen": ["127.0.0.1:0", "udp:127.0.0.1:0", f"udp:127.0.0.1:{tcp_port}"],
            "trigger": "edge",
            "udp": {"refuse_source_ports": [source_port], "max_datagram": 100},
        })  # fmt: skip
        daemon.signal(signal.SIGHUP)
        daemon.wait_for("config_reloaded")
        added = daemon.wait_for("listening", address=f"udp:127.0.0.1:{tcp_port}")
        assert added[0]["fd"] != kept_fd
        assert not daemon.events("listener_closed")
        with client() as fresh:
            fresh.sendto(b"shared port", ("127.0.0.1", tcp_port))
            assert fresh.recv(20) == b"shared port"
            c.sendto(b"refused now", kept)  # the new refused port applies at once
            fresh.sendto(b"x" * 101, kept)  # so does the new max_datagram
            fresh.sendto(b"kept", kept)
            assert fresh.recv(200) == b"kept"
        assert drain(c) == []
    # The kept listener was not re-bound: it still answers on its port and fd.
    write_config(daemon.config_path, {"listen": ["127.0.0.1:0", "udp:127.0.0.1:0"]})
    daemon.signal(signal.SIGHUP)
    daemon.wait_for("listener_closed", address=f"udp:127.0.0.1:{tcp_port}")
    with client() as c:
        c.sendto(b"after", kept)
        assert c.recv(10) == b"after"
    counters = stats(daemon)
    assert counters["udp_listeners"] == 1
    assert counters["udp_dropped_source_port"] == 1
    assert counters["udp_dropped_truncated"] == 1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
        again.bind(("127.0.0.1", tcp_port))  # the removed one's socket is closed


def test_graceful_stop_closes_udp_and_reports_counts(start_daemon: StartDaemon) -> None:
    """SIGTERM closes UDP sockets at once, while a TCP connection still drains; the daemon
    exits 0 and shutdown_complete has the counts."""
    daemon = start_daemon(udp_config(["127.0.0.1:0", "udp:127.0.0.1:0"]))
    daemon.wait_for("listening", count=2)
    (address,) = udp_addresses(daemon)
    with client() as c:
        c.sendto(b"one", address)
        assert c.recv(10) == b"one"
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=WAIT_S) as tcp:
        tcp.sendall(b"draining")
        assert tcp.recv(10) == b"draining"
        daemon.signal(signal.SIGTERM)
        daemon.wait_for("shutdown_started")  # logged just before the sockets are closed
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
            deadline = time.monotonic() + WAIT_S / 2  # shutdown_timeout is 10 s
            while True:
                try:
                    again.bind(address)  # the daemon's UDP socket is closed
                    break
                except OSError:
                    assert time.monotonic() < deadline, "the UDP socket stayed open"
                    time.sleep(0.01)
        assert daemon.proc.poll() is None  # still draining the TCP connection
        assert not daemon.events("shutdown_complete")
    assert daemon.wait() == 0
    (done,) = daemon.events("shutdown_complete")
    assert (done["udp_received"], done["udp_echoed"], done["udp_dropped"]) == (1, 1, 0)


def test_socket_activation_serves_an_inherited_udp_socket(tmp_path: Path) -> None:
    """A UDP socket passed as LISTEN_FDS (ListenDatagram=) is served as UDP echo."""
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("0.0.0.0", 0))
    port = udp.getsockname()[1]
    config = write_config(tmp_path / "epolld.yaml", {"listen": ["127.0.0.1:0"]})
    high = fcntl.fcntl(udp.fileno(), fcntl.F_DUPFD_CLOEXEC, 10)
    udp.close()
    launcher = 'export LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=udp; exec "$0" "$@" 3<&' + str(
        high
    )
    proc = subprocess.Popen(
        ["bash", "-c", launcher, sys.executable, "-m", "epolld", "--config", str(config),
         "--log-format", "json"],
        pass_fds=[high], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    os.close(high)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + WAIT_S
        for line in proc.stdout:
            if '"listening"' in line:
                assert f'"udp:0.0.0.0:{port}"' in line
                break
            assert time.monotonic() < deadline
        with client() as c:
            c.connect(("127.0.0.2", port))  # the wildcard answers from the right address
            c.send(b"activated")
            assert c.recv(20) == b"activated"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT_S) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(WAIT_S)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def shaped_link() -> Iterator[tuple[str, str]]:
    """Two network namespaces joined by a veth pair; the server side sends at 8 kbit/s
    (tbf), so the daemon's replies pile up in the qdisc and fill its send buffer.

    Yields (server namespace, client namespace); the server is 10.201.0.1, the client
    10.201.0.2.
    """
    tag = f"{os.getpid() % 100000}"
    server_ns, client_ns = f"epolld-s{tag}", f"epolld-c{tag}"
    commands = [
        ["ip", "netns", "add", server_ns],
        ["ip", "netns", "add", client_ns],
        ["ip", "link", "add", f"es{tag}", "netns", server_ns, "type", "veth",
         "peer", "name", f"ec{tag}", "netns", client_ns],
        ["ip", "-n", server_ns, "addr", "add", "10.201.0.1/30", "dev", f"es{tag}"],
        ["ip", "-n", client_ns, "addr", "add", "10.201.0.2/30", "dev", f"ec{tag}"],
        ["ip", "-n", server_ns, "link", "set", f"es{tag}", "up"],
        ["ip", "-n", client_ns, "link", "set", f"ec{tag}", "up"],
        ["ip", "-n", server_ns, "link", "set", "lo", "up"],
        ["tc", "-n", server_ns, "qdisc", "add", "dev", f"es{tag}", "root", "tbf",
         "rate", "8kbit", "burst", "1600", "limit", "100000000"],
    ]  # fmt: skip
    try:
        for command in commands:
            subprocess.run(command, check=True, capture_output=True, timeout=WAIT_S)
        yield server_ns, client_ns
    finally:
        for ns in (server_ns, client_ns):  # deleting a namespace deletes its veth end
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=WAIT_S)


def in_namespace(ns: str, code: str) -> str:
    """Run Python code in network namespace ns; return its stdout."""
    return subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", code],
        check=True, capture_output=True, text=True, timeout=WAIT_S * 3,
    ).stdout  # fmt: skip


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and tc need root")
def test_full_send_buffer_drops_and_counts(
    tmp_path: Path, mode: dict[str, Any], shaped_link: tuple[str, str]
) -> None:
    """When replies cannot leave (EAGAIN on send), they are dropped and counted, never
    buffered: the daemon neither grows nor spins, and still answers on another path."""
    server_ns, client_ns = shaped_link
    config = write_config(tmp_path / "epolld.yaml", {
        "listen": ["udp:0.0.0.0:0"], **mode,
        "udp": {"rate": 0, "byte_rate": 0, "total_rate": 0},
    })  # fmt: skip
    daemon = Daemon(config, prefix=("ip", "netns", "exec", server_ns))
    try:
        daemon.wait_for("listening")
        (_, port) = udp_addresses(daemon)[0]
        rss_before = daemon.rss_bytes()
        in_namespace(client_ns, (
            "import socket\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "for i in range(5000):\n"
            f"    s.sendto(b'x' * 1000, ('10.201.0.1', {port}))\n"
        ))  # fmt: skip
        probe = in_namespace(server_ns, (
            "import socket, time\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "s.settimeout(0.5)\n"
            "for _ in range(20):\n"
            f"    s.sendto(b'probe', ('127.0.0.1', {port}))\n"
            "    try:\n"
            "        print(s.recv(100).decode()); break\n"
            "    except TimeoutError:\n"
            "        pass\n"
        ))  # fmt: skip
        assert probe == "probe\n"  # loopback is not shaped: the daemon still answers
        cpu_before = daemon.cpu_seconds()
        time.sleep(1.0)  # replies still wait in the qdisc: no EPOLLOUT, no busy loop
        assert daemon.cpu_seconds() - cpu_before < 0.3
        counters = stats(daemon)
        assert counters["udp_dropped_send_buffer"] > 0
        assert counters["udp_received"] == counters["udp_echoed"] + counters["udp_dropped"]
        assert counters["udp_echoed"] < 1000  # the send buffer holds a few hundred at most
        assert daemon.rss_bytes() - rss_before < 4 * 1024 * 1024
    finally:
        daemon.stop()


def test_daemon_mode_serves_udp(daemons: Daemons, tmp_path: Path) -> None:
    """`epolld --daemon` keeps its UDP socket across detaching and echoes on it."""
    settings = _epolld_settings(tmp_path)
    settings["listen"] = ["127.0.0.1:0", "udp:127.0.0.1:0"]
    result = daemons.start_epolld(settings)
    assert result.returncode == 0, result.stderr
    log = tmp_path / "epolld.log"
    address = next(
        e["address"] for e in _logged(log, "listening", count=2) if e["address"].startswith("udp:")
    )
    with client() as c:
        c.sendto(b"detached", ("127.0.0.1", int(address.rpartition(":")[2])))
        assert c.recv(20) == b"detached"
    os.kill(daemons.pids[0], signal.SIGTERM)
    (done,) = _logged(log, "shutdown_complete")
    assert (done["udp_received"], done["udp_echoed"]) == (1, 1)


def test_status_names_udp_listeners_and_counts(tmp_path: Path, mode: dict[str, Any]) -> None:
    """systemd's STATUS= names the UDP listener and, after a reload, the datagrams echoed."""
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(str(tmp_path / "notify"))
    manager.settimeout(WAIT_S)
    config = write_config(tmp_path / "epolld.yaml", {"listen": ["udp:127.0.0.1:0"], **mode})
    daemon = Daemon(config, env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")})
    try:

        def next_status() -> str:
            while True:
                message = manager.recv(4096).decode()
                if "READY=1" in message:
                    return message.partition("STATUS=")[2]

        status = next_status()
        daemon.wait_for("listening")
        ((host, port),) = udp_addresses(daemon)
        assert status.startswith(f"echoing on udp:{host}:{port}; 0 connections;")
        assert status.endswith("; 0 datagrams echoed, 0 dropped")
        with client() as c:
            c.sendto(b"count me", (host, port))
            assert c.recv(10) == b"count me"
        daemon.signal(signal.SIGHUP)
        assert next_status().endswith("; 1 datagrams echoed, 0 dropped")
    finally:
        daemon.stop()
        manager.close()


def test_replies_to_closed_ports_do_not_disturb(start_daemon: StartDaemon) -> None:
    """Clients that close before their reply (ICMP port unreachable comes back) leave the
    daemon serving: the next client is answered and nothing is counted as a send error."""
    daemon = start_daemon(udp_config(["udp:127.0.0.1:0"], total_rate=0))
    (address,) = udp_addresses(daemon)
    for i in range(200):
        with client(bind=(f"127.0.1.{1 + i % 200}", 0)) as gone:
            gone.sendto(b"bye", address)  # closed at once: the reply meets a closed port
    with client() as c:
        ask_until_answered(c, b"still serving", address)
    counters = stats(daemon)
    assert counters["udp_received"] >= 201
    assert counters["udp_echoed"] == counters["udp_received"]  # each reply was sent
    assert counters["udp_dropped"] == 0


def test_total_rate_caps_replies_to_many_sources(start_daemon: StartDaemon) -> None:
    """5,000 sources, each within its own rate, together get no more than total_rate x
    seconds + one second's worth of replies; the rest are dropped as total_rate."""
    daemon = start_daemon(udp_config(["udp:0.0.0.0:0"], total_rate=500))
    (_, port) = udp_addresses(daemon)[0]
    started = time.monotonic()
    for n in range(5000):
        with client(bind=(f"127.3.{n >> 8}.{(n & 255) or 1}", 0)) as c:
            c.sendto(b"many", ("127.0.0.1", port))
    with client(bind=("127.4.0.1", 0)) as probe:
        ask_until_answered(probe, b"probe", ("127.0.0.1", port))  # all handled before it
    elapsed = time.monotonic() - started
    counters = stats(daemon)
    assert counters["udp_echoed"] <= 500 * elapsed + 500
    assert counters["udp_dropped_total_rate"] > 0
    assert counters["udp_received"] == counters["udp_echoed"] + counters["udp_dropped"]
    assert daemon.events("udp_total_rate_limited")


def test_metrics_endpoint_exports_udp_counters(start_daemon: StartDaemon) -> None:
    """With metrics on, /metrics carries the datagrams received, sent and dropped by reason."""
    from tests.test_metrics_endpoint import metrics_port, scrape

    daemon = start_daemon({
        **udp_config(["udp:127.0.0.1:0"], max_datagram=100),
        "metrics": {"listen": "127.0.0.1:0"},
    })  # fmt: skip
    (address,) = udp_addresses(daemon)
    with client() as c:
        c.sendto(b"x" * 101, address)  # dropped: truncated
        c.sendto(b"counted", address)
        assert c.recv(10) == b"counted"
    samples = scrape(metrics_port(daemon))
    assert samples[("epolld_udp_datagrams_received_total", ())] == 2
    assert samples[("epolld_udp_datagrams_sent_total", ())] == 1
    assert samples[("epolld_udp_datagrams_dropped_total", (("reason", "truncated"),))] == 1
    assert samples[("epolld_udp_datagrams_dropped_total", (("reason", "rate"),))] == 0
