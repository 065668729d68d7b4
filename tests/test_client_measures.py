"""epolld-client measures (issue 22): --json, --rate/--interval/--duration, --udp, --tls,
--proxy-header, --tos, -4/-6 and --service, each against the daemon as a real subprocess
where it serves the thing, else against a small real server on loopback in the test.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from epolld.client import cli, errors, proxy_header
from epolld.client.services import CYCLE, LINE
from epolld.tcp.proxy import HeaderParser
from tests import echo_servers
from tests import tls_support as tls
from tests.echo_servers import serving
from tests.epolld_process import Daemon, write_config

RUN_TIMEOUT_S = 60.0
IP_PKTOPTIONS = 9  # linux/in.h: a TCP socket's last received IP options as cmsgs


def run_client(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m epolld.client ARGS` with stdin from /dev/null and wait for it."""
    return subprocess.run(
        [sys.executable, "-m", "epolld.client", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )


def run_json(*args: str) -> tuple[int, dict[str, Any]]:
    """Run the client with --json; its stdout must be exactly one JSON object."""
    result = run_client(*args, "--json")
    (line,) = result.stdout.splitlines()
    document = json.loads(line)
    assert isinstance(document, dict)
    assert document["exit_status"] == result.returncode, result.stderr
    assert document["exit_meaning"] == errors.MEANINGS[result.returncode]
    return result.returncode, document


def at(port: int, host: str = "127.0.0.1") -> list[str]:
    return ["--host", host, "--port", str(port)]


# The daemon: one process for the module, one listener per kind


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tls.Certs:
    return tls.make_certs(tmp_path_factory.mktemp("certs"))


class Served:
    """The module's daemon and the port of each of its listeners, by name."""

    def __init__(self, daemon: Daemon, ports: dict[str, int]) -> None:
        self.daemon = daemon
        self.ports = ports


LISTENERS = {
    "tcp4": "127.0.0.1:0",
    "tcp6": "[::1]:0",
    "udp4": "udp:127.0.0.1:0",
    "udp6": "udp:[::1]:0",
    "proxy": {"address": "127.0.0.2:0", "proxy_protocol": True},
    "tls": {"address": "127.0.0.3:0", "tls": True},
    "mtls": {"address": "127.0.0.4:0", "tls": {"client_ca": "CA"}},
    "tls-proxy": {"address": "127.0.0.5:0", "tls": True, "proxy_protocol": True},
}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, certs: tls.Certs) -> Iterator[Served]:
    listen: list[Any] = []
    for entry in LISTENERS.values():
        if isinstance(entry, dict) and isinstance(entry.get("tls"), dict):
            entry = {**entry, "tls": {"client_ca": str(certs.ca.certificate)}}
        listen.append(entry)
    config = {
        "listen": listen,
        "tls": {
            "certificate": str(certs.server.certificate),
            "key": str(certs.server.key),
            "sni": [
                {
                    "names": ["other.example"],
                    "certificate": str(certs.other.certificate),
                    "key": str(certs.other.key),
                }
            ],
        },
        "udp": {"rate": 0, "total_rate": 0, "byte_rate": 0},
        "logging": {"level": "info", "connections": True},
    }
    path = write_config(tmp_path_factory.mktemp("daemon") / "epolld.yaml", config)
    daemon = Daemon(path)
    try:
        listening = daemon.wait_for("listening", count=len(listen))
        ports = {}
        for name, entry in LISTENERS.items():
            address = entry if isinstance(entry, str) else entry["address"]
            host = address.rsplit(":", 1)[0]
            (logged,) = [e["address"] for e in listening if e["address"].rsplit(":", 1)[0] == host]
            ports[name] = int(logged.rsplit(":", 1)[1])
        yield Served(daemon, ports)
    finally:
        print(daemon.tail(40))
        daemon.stop()
    assert not daemon.bad_lines


# --json and the latency summary


def test_json_check_against_epolld_has_sane_figures(served: Served) -> None:
    """--check --json against epolld: one object, every figure present and consistent."""
    code, doc = run_json(
        "--check", *at(served.ports["tcp4"]), "--count=50", "--connections=2", "--size=2KiB"
    )
    assert code == 0
    assert (doc["mode"], doc["messages"], doc["bytes_echoed"]) == ("echo", 100, 204800)
    assert doc["target"] == f"127.0.0.1:{served.ports['tcp4']}"
    assert doc["error"] is None
    latency = doc["latency_ms"]
    assert latency["count"] == 100
    figures = [latency[k] for k in ("min", "p50", "p90", "p99", "p99.9", "max")]
    assert figures[0] > 0
    assert figures == sorted(figures)
    assert latency["min"] <= latency["mean"] <= latency["max"]
    assert doc["elapsed_s"] > 0
    assert doc["throughput_bytes_per_s"] == pytest.approx(204800 / doc["elapsed_s"])


def test_json_reports_a_failure_with_its_meaning() -> None:
    """A refused connection still prints one JSON object: the status, its meaning, why."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))  # bound, never listening
        code, doc = run_json("--check", *at(held.getsockname()[1]))
    assert code == errors.EXIT_REFUSED
    assert "connection refused" in doc["error"]
    assert doc["exit_meaning"].startswith("connection refused")


def delaying(seconds: float) -> echo_servers.Handler:
    """A handler that echoes each chunk it reads after sleeping `seconds`."""

    def handle(conn: socket.socket) -> None:
        while data := conn.recv(echo_servers.RECV_SIZE):
            time.sleep(seconds)
            conn.sendall(data)

    return handle


def test_a_100ms_delay_shows_in_p50() -> None:
    """Against a server that waits 100 ms before each echo, p50 is at least 100 ms."""
    with serving(delaying(0.1)) as server:
        code, doc = run_json("--check", *at(server.port), "--count=5", "--size=100")
    assert code == 0
    assert doc["latency_ms"]["p50"] >= 100
    assert doc["latency_ms"]["min"] >= 100


# Pacing


class Stamping:
    """An echo handler that notes when each chunk arrived."""

    def __init__(self) -> None:
        self.arrivals: list[float] = []

    def __call__(self, conn: socket.socket) -> None:
        while data := conn.recv(echo_servers.RECV_SIZE):
            self.arrivals.append(time.monotonic())
            conn.sendall(data)


def test_rate_spaces_the_messages() -> None:
    """--rate 50: the server sees 11 messages at least 10 x 20 ms apart from first to last."""
    stamping = Stamping()
    with serving(stamping) as server:
        code, _ = run_json("--check", *at(server.port), "--rate=50", "--count=11", "--size=64")
    assert code == 0
    assert len(stamping.arrivals) == 11
    # 1 ms of slack per interval for timer rounding; a loaded machine is only slower
    assert stamping.arrivals[-1] - stamping.arrivals[0] >= 10 * 0.019


def test_interval_and_duration_bound_the_messages() -> None:
    """--interval 0.1 --duration 0.55 starts at most 6 messages (t = 0, 0.1, ... 0.5)."""
    stamping = Stamping()
    with serving(stamping) as server:
        code, doc = run_json(
            "--check", *at(server.port), "--interval=0.1", "--duration=0.55", "--size=64"
        )
    assert code == 0
    assert 2 <= doc["messages"] == len(stamping.arrivals) <= 6
    first = stamping.arrivals[0]  # message k starts no sooner than k intervals after the 1st
    assert all(t - first >= k * 0.1 - 0.005 for k, t in enumerate(stamping.arrivals))


def test_duration_alone_runs_until_it_ends() -> None:
    """--duration without --count keeps sending until the time is up, then stops."""
    with serving(echo_servers.echo) as server:
        started = time.monotonic()
        code, doc = run_json("--check", *at(server.port), "--duration=0.3", "--size=64")
        took = time.monotonic() - started
    assert code == 0
    assert doc["messages"] > 10
    assert doc["elapsed_s"] >= 0.3
    assert took < 10


# UDP


def test_udp_against_epolld_on_ipv4_and_ipv6(served: Served) -> None:
    """--udp: every datagram echoed once, in order, on 127.0.0.1 and [::1]."""
    for host, name in (("127.0.0.1", "udp4"), ("::1", "udp6")):
        code, doc = run_json(
            "--udp", *at(served.ports[name], host), "--count=200", "--rate=2000", "--size=24-900"
        )
        assert code == 0, doc
        assert (doc["sent"], doc["received"], doc["lost"]) == (200, 200, 0)
        assert (doc["duplicates"], doc["reordered"], doc["corrupt"]) == (0, 0, 0)
        assert doc["latency_ms"]["count"] == 200
        assert doc["mode"] == "udp"


class UdpServer:
    """A real UDP server on 127.0.0.1 (or ::1) answering with `reply` in a thread."""

    def __init__(
        self,
        reply: Callable[[socket.socket, bytes, Any, list[Any]], None],
        family: int = socket.AF_INET,
    ) -> None:
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1" if family == socket.AF_INET else "::1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.received: list[bytes] = []
        self.ancillary: list[Any] = []
        self._reply = reply
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> UdpServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self.sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            readable, _, _ = select.select([self.sock], [], [], 0.05)
            if readable:
                data, ancillary, _, peer = self.sock.recvmsg(65536, 256)
                self.received.append(data)
                self.ancillary.append(ancillary)
                self._reply(self.sock, data, peer, self.received)


def lossy(sock: socket.socket, data: bytes, peer: Any, received: list[Any]) -> None:
    """Drop every 3rd datagram, send the 4th twice, hold the 5th back until after the 7th."""
    n = len(received)
    if n % 3 == 0:
        return
    if n == 5:
        return
    sock.sendto(data, peer)
    if n == 4:
        sock.sendto(data, peer)
    if n == 7:
        sock.sendto(received[4], peer)


def test_udp_counts_loss_duplicates_and_reordering() -> None:
    """Against a server that drops every 3rd datagram, repeats one and delays one,
    30 datagrams give 10 lost, 1 duplicated, 1 reordered, 20 echoed."""
    with UdpServer(lossy) as server:
        code, doc = run_json("--udp", *at(server.port), "--count=30", "--rate=500", "--size=64")
    assert code == 0, doc
    assert (doc["sent"], doc["received"], doc["lost"]) == (30, 20, 10)
    assert (doc["duplicates"], doc["reordered"], doc["corrupt"]) == (1, 1, 0)
    assert doc["loss_percent"] == pytest.approx(100 / 3)
    assert len(server.received) == 30


def test_udp_corrupted_echo_exits_65() -> None:
    """A datagram echoed with a flipped byte is counted corrupt and fails the run."""

    def flipping(sock: socket.socket, data: bytes, peer: Any, received: list[Any]) -> None:
        sock.sendto(data[:-1] + bytes([data[-1] ^ 1]) if len(received) == 2 else data, peer)

    with UdpServer(flipping) as server:
        result = run_client("--udp", *at(server.port), "--count=5", "--size=100")
    assert result.returncode == errors.EXIT_MISMATCH
    assert "4 echoed, 1 lost" in result.stdout
    assert "1 corrupt" in result.stdout
    assert "Error: 1 echoed datagrams differ" in result.stderr


def test_udp_loss_against_a_rate_limited_epolld(tmp_path: Path) -> None:
    """epolld limiting a source to 100 datagrams/s (burst 20): the client counts the rest lost."""
    config = {"listen": ["udp:127.0.0.1:0"], "udp": {"rate": 100, "burst": 20}}
    daemon = Daemon(write_config(tmp_path / "epolld.yaml", config))
    try:
        (address,) = [e["address"] for e in daemon.wait_for("listening")]
        port = int(address.rsplit(":", 1)[1])
        code, doc = run_json("--udp", *at(port), "--count=300", "--rate=3000", "--size=64")
    finally:
        daemon.stop()
    assert code == 0, doc
    assert doc["sent"] == 300
    assert doc["received"] + doc["lost"] == 300
    # the burst plus 100/s over the run's length, and a margin for a slow run
    assert 20 <= doc["received"] <= 20 + 100 * (doc["elapsed_s"] + 1.0)
    assert doc["lost"] > 100


def test_udp_with_nothing_listening_is_refused() -> None:
    """ICMP port unreachable on loopback gives the refused exit code."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = run_client("--udp", *at(port), "--count=3")
    assert result.returncode == errors.EXIT_REFUSED, result.stderr
    assert f"nothing listens on UDP 127.0.0.1:{port}" in result.stderr


# TLS


def tls_args(certs: tls.Certs, *more: str) -> list[str]:
    return ["--tls", "--ca", str(certs.ca.certificate), *more]


def test_tls_check_verifies_the_server(served: Served, certs: tls.Certs) -> None:
    """--tls --ca --sni: the echo passes over TLS; the daemon logs the handshake."""
    port = served.ports["tls"]
    code, doc = run_json(
        "--check", *at(port, "127.0.0.3"), *tls_args(certs, "--sni=localhost"), "--count=20"
    )
    assert code == 0, doc
    assert (doc["transport"], doc["messages"]) == ("tls", 20)
    established = served.daemon.wait_for("tls_established", sni="localhost")
    assert established[-1]["version"] in ("TLSv1.2", "TLSv1.3")


def test_tls_untrusted_or_misnamed_server_exits_77(served: Served, certs: tls.Certs) -> None:
    """Without our CA, or asking for a name the certificate lacks, the handshake fails (77);
    --insecure skips both checks."""
    where = at(served.ports["tls"], "127.0.0.3")
    untrusted = run_client("--check", *where, "--tls", "--sni=localhost")
    assert untrusted.returncode == errors.EXIT_TLS
    assert "failed: unable to get local issuer certificate" in untrusted.stderr
    misnamed = run_client("--check", *where, *tls_args(certs))  # 127.0.0.3 is not in it
    assert misnamed.returncode == errors.EXIT_TLS
    assert "IP address mismatch" in misnamed.stderr
    insecure = run_client("--check", *where, "--tls", "--insecure", "--count=3")
    assert insecure.returncode == 0, insecure.stderr


def test_tls_sni_picks_the_other_certificate(served: Served, certs: tls.Certs) -> None:
    """--sni other.example gets tls.sni's certificate for that name, which verifies."""
    code, doc = run_json(
        "--check", *at(served.ports["tls"], "127.0.0.3"), *tls_args(certs, "--sni=other.example")
    )
    assert code == 0, doc
    served.daemon.wait_for("tls_established", sni="other.example")


def test_mutual_tls(served: Served, certs: tls.Certs) -> None:
    """--cert/--key: a listener with client_ca echoes and logs our subject; without them
    the server refuses us and the client says so."""
    where = at(served.ports["mtls"], "127.0.0.4")
    cert = ["--cert", str(certs.client.certificate), "--key", str(certs.client.key)]
    code, doc = run_json("--check", *where, *tls_args(certs, "--sni=localhost", *cert))
    assert code == 0, doc
    logged = served.daemon.wait_for("tls_established")
    assert any("CN=client.example" in (e.get("client_subject") or "") for e in logged)
    refused = run_client("--check", *where, *tls_args(certs, "--sni=localhost"))
    # TLS 1.3: the refusal is an alert after the client's handshake ends (77), or a reset
    # if the client's first write meets the closed connection first (74)
    assert refused.returncode in (errors.EXIT_TLS, errors.EXIT_RESET), refused.stderr
    if refused.returncode == errors.EXIT_TLS:
        assert "CERTIFICATE_REQUIRED" in refused.stderr
    served.daemon.wait_for("connection_closed", error="no_client_certificate")


def test_interactive_mode_over_tls(served: Served, certs: tls.Certs) -> None:
    """Interactive (piped) mode speaks TLS too."""
    result = subprocess.run(
        [sys.executable, "-m", "epolld.client", *at(served.ports["tls"], "127.0.0.3"),
         *tls_args(certs, "--sni=localhost")],
        input=b"Input Something\n",
        capture_output=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )  # fmt: skip
    assert (result.returncode, result.stdout) == (0, b"Input Something\n"), result.stderr


# PROXY header


@pytest.mark.parametrize(
    ("version", "source", "peer"),
    [
        ("v1", "192.0.2.7:4000", "192.0.2.7:4000"),
        ("v2", "[2001:db8::8]:6", "[2001:db8::8]:6"),
    ],
)
def test_proxy_header_names_the_source(
    served: Served, version: str, source: str, peer: str
) -> None:
    """--proxy-header VERSION --source ADDR:PORT: epolld logs that address as the client."""
    code, doc = run_json(
        "--check", *at(served.ports["proxy"], "127.0.0.2"), f"--proxy-header={version}",
        f"--source={source}", "--count=5",
    )  # fmt: skip
    assert code == 0, doc
    opened = served.daemon.wait_for("connection_opened", peer=peer)[-1]
    assert opened["proxy"].startswith("127.0.0.1:")


def test_proxy_header_without_source_names_the_socket_itself(served: Served) -> None:
    """Without --source the header names the client's own address, as a proxy's would."""
    result = run_client(
        "--check", *at(served.ports["proxy"], "127.0.0.2"), "--proxy-header=v2", "--count=2"
    )
    assert result.returncode == 0, result.stderr
    served.daemon.wait_for("connection_closed", count=1)
    proxied = [e for e in served.daemon.events("connection_opened") if "proxy" in e]
    assert any(e["peer"] == e["proxy"] for e in proxied), proxied


def test_proxy_header_then_tls(served: Served, certs: tls.Certs) -> None:
    """The header goes before the ClientHello: a TLS + PROXY listener names the source."""
    code, doc = run_json(
        "--check", *at(served.ports["tls-proxy"], "127.0.0.5"), "--proxy-header=v1",
        "--source=198.51.100.9:999", *tls_args(certs, "--sni=localhost"), "--count=5",
    )  # fmt: skip
    assert code == 0, doc
    served.daemon.wait_for("tls_established", peer="198.51.100.9:999")


def test_a_proxy_listener_refuses_a_client_without_header(served: Served) -> None:
    """Without --proxy-header the same listener closes the connection: the flag matters."""
    result = run_client("--check", *at(served.ports["proxy"], "127.0.0.2"), "--count=1")
    assert result.returncode in (errors.EXIT_CLOSED_EARLY, errors.EXIT_RESET, errors.EXIT_TIMEOUT)


# -4, -6 and --tos


def test_ipv4_and_ipv6_flags(served: Served) -> None:
    """-6 reaches [::1]; -4 with an IPv6 address (and -6 with an IPv4 one) cannot resolve."""
    ok = run_client("--check", "-6", *at(served.ports["tcp6"], "::1"), "--count=5")
    assert ok.returncode == 0, ok.stderr
    assert f"echoed intact by [::1]:{served.ports['tcp6']}" in ok.stdout
    for flag, host in (("-4", "::1"), ("-6", "127.0.0.1")):
        result = run_client("--check", flag, *at(served.ports["tcp4"], host))
        assert result.returncode == errors.EXIT_RESOLVE, (flag, result.stderr)


def _tos_of(ancillary: list[tuple[int, int, bytes]]) -> int | None:
    for level, kind, data in ancillary:
        if (level, kind) in ((socket.IPPROTO_IP, socket.IP_TOS), (socket.IPPROTO_IPV6, 67)):
            return data[0]  # IP_TOS is one byte; IPV6_TCLASS an int (little-endian here)
    return None


def echo_datagram(sock: socket.socket, data: bytes, peer: Any, received: list[Any]) -> None:
    sock.sendto(data, peer)


@pytest.mark.parametrize(("family", "tos"), [(socket.AF_INET, 0xB8), (socket.AF_INET6, 0x28)])
def test_tos_marks_datagrams(family: int, tos: int) -> None:
    """--tos marks each datagram (IPv4 TOS, IPv6 traffic class), as the server receives it."""
    with UdpServer(echo_datagram, family) as server:
        if family == socket.AF_INET:
            server.sock.setsockopt(socket.IPPROTO_IP, socket.IP_RECVTOS, 1)
            where = [*at(server.port), "-4"]
        else:
            server.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVTCLASS, 1)
            where = [*at(server.port, "::1"), "-6"]
        result = run_client("--udp", *where, f"--tos={tos:#x}", "--count=3", "--size=32")
    assert result.returncode == 0, result.stderr
    assert [_tos_of(a) for a in server.ancillary] == [tos] * 3


def test_tos_marks_a_stream() -> None:
    """--tos on TCP: the server's socket reports the TOS of the last segment it received."""
    seen: list[bytes] = []

    def recording(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_IP, socket.IP_RECVTOS, 1)
        while data := conn.recv(echo_servers.RECV_SIZE):
            seen.append(conn.getsockopt(socket.IPPROTO_IP, IP_PKTOPTIONS, 64))
            conn.sendall(data)

    with serving(recording) as server:
        server.listener.setsockopt(socket.IPPROTO_IP, socket.IP_RECVTOS, 1)
        result = run_client("--check", *at(server.port), "--tos=0x48", "--count=3", "--size=64")
    assert result.returncode == 0, result.stderr
    # struct cmsghdr (size_t length, int level, int type), then the TOS byte in an int
    tos = [(*struct.unpack_from("=Qii", c)[1:], c[16]) for c in seen if len(c) >= 17]
    assert tos, seen
    assert all(t == (socket.IPPROTO_IP, socket.IP_TOS, 0x48) for t in tos), seen


# --service, against small real servers (epolld's own services are being built)


def discarding(received: list[int]) -> echo_servers.Handler:
    def handle(conn: socket.socket) -> None:
        total = 0
        while data := conn.recv(echo_servers.RECV_SIZE):
            total += len(data)
        received.append(total)  # then the handler returns: the server's FIN

    return handle


def test_discard_measures_one_way_throughput() -> None:
    """--service discard sends --count x --size bytes; the figure counts what the server read."""
    received: list[int] = []
    with serving(discarding(received)) as server:
        code, doc = run_json("--service=discard", *at(server.port), "--count=20", "--size=64KiB")
    assert code == 0, doc
    assert doc["bytes_sent"] == received[0] == 20 * 65536
    assert doc["throughput_bytes_per_s"] > 0
    assert doc["mode"] == "discard"


def test_discard_server_that_answers_fails() -> None:
    """An echo server is not a discard server: exit 65."""
    with serving(echo_servers.echo) as server:
        result = run_client("--service=discard", *at(server.port), "--count=3", "--size=100")
    assert result.returncode == errors.EXIT_MISMATCH
    assert "sent 300 bytes back" in result.stderr


def chargen(first: int, broken_at: int | None = None) -> echo_servers.Handler:
    """A chargen handler starting at printable character `first`; a wrong byte at broken_at."""

    def handle(conn: socket.socket) -> None:
        stream = CYCLE[first * LINE :] + CYCLE * 20
        if broken_at is not None:
            stream = stream[:broken_at] + b"\x00" + stream[broken_at + 1 :]
        with contextlib.suppress(OSError):  # the client closes when it has read enough
            conn.sendall(stream)

    return handle


@pytest.mark.parametrize("first", [1, 94])
def test_chargen_pattern_is_verified(first: int) -> None:
    """--service chargen reads --count x --size bytes, whatever line the server starts on."""
    with serving(chargen(first)) as server:
        code, doc = run_json("--service=chargen", *at(server.port), "--count=10", "--size=10000")
    assert code == 0, doc
    assert (doc["bytes_received"], doc["lines"]) == (100000, 100000 // LINE)


def test_chargen_pattern_broken_is_reported() -> None:
    """A wrong byte at offset 5000 fails with exit 65 naming the offset, line and column."""
    with serving(chargen(1, broken_at=5000)) as server:
        result = run_client("--service=chargen", *at(server.port), "--count=10", "--size=1000")
    assert result.returncode == errors.EXIT_MISMATCH
    assert "chargen pattern broken at stream offset 5000 (line 68, column 43)" in result.stderr


def test_chargen_pattern_is_rfc_864s() -> None:
    """The checker's pattern: 72 printable characters, CR LF, each line one further on."""
    first, second = CYCLE[:LINE], CYCLE[LINE : 2 * LINE]
    assert first == bytes(range(32, 32 + 72)) + b"\r\n"
    assert second == bytes(range(33, 33 + 72)) + b"\r\n"
    assert CYCLE[94 * LINE : 95 * LINE] == b"~" + bytes(range(32, 32 + 71)) + b"\r\n"
    assert len(CYCLE) == 95 * 74


INFO = {"host": "backend-7", "peer": "127.0.0.1:5", "tls": {"version": "TLSv1.3"}}


def test_info_is_printed() -> None:
    """--service info prints each field the server sent; --json carries the object."""

    def info(conn: socket.socket) -> None:
        conn.sendall(json.dumps(INFO).encode() + b"\n")

    with serving(info) as server:
        text = run_client("--service=info", *at(server.port))
        code, doc = run_json("--service=info", *at(server.port))
    assert text.returncode == 0, text.stderr
    assert "  host: backend-7\n" in text.stdout
    assert "  tls.version: TLSv1.3\n" in text.stdout
    assert (code, doc["info"]) == (0, INFO)


def test_info_that_is_not_json_fails() -> None:
    with serving(lambda conn: conn.sendall(b"hello\n")) as server:
        result = run_client("--service=info", *at(server.port))
    assert result.returncode == errors.EXIT_MISMATCH
    assert "is not one line of JSON: 'hello\\n'" in result.stderr


def test_udp_info_pads_its_request() -> None:
    """Over UDP the request is padded to 512 bytes, so a server may answer without amplifying."""

    def info(sock: socket.socket, data: bytes, peer: Any, received: list[Any]) -> None:
        if len(data) >= 512:
            sock.sendto(json.dumps(INFO).encode(), peer)

    with UdpServer(info) as server:
        code, doc = run_json("--service=info", "--udp", *at(server.port))
    assert (code, doc["info"], doc["transport"]) == (0, INFO, "udp")
    assert [len(d) for d in server.received] == [512]


def test_udp_discard_sends_datagrams() -> None:
    """--udp --service discard sends --count datagrams and expects none back."""
    with UdpServer(lambda *_: None) as server:
        code, doc = run_json(
            "--service=discard", "--udp", *at(server.port), "--count=20", "--size=100",
            "--rate=1000",
        )  # fmt: skip
    assert code == 0, doc
    assert doc["datagrams_sent"] == 20
    assert len(server.received) == 20


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--json"], "--json only make sense with --check, --udp or --service"),
        (["--check", "--ca=x"], "--ca only make sense with --tls"),
        (["--check", "--rate=1", "--interval=1"], "not allowed with argument"),
        (["--udp", "--tls"], "--udp excludes --tls"),
        (["--udp", "--service=chargen"], "UDP chargen is an amplifier"),
        (["--check", "--source=192.0.2.1:1"], "--source only makes sense with --proxy-header"),
        (["--check", "--proxy-header=v1", "--source=example:1"], "with a literal address"),
        (["--check", "--tos=256"], "a TOS byte is 0-255"),
        (["--check", "--rate=0"], "must be above 0"),
        (["--check", "-4", "-6"], "not allowed with argument"),
        (["--udp", "--size=10"], "--size 24+"),
        (["--service=info", "--mode=pipelined"], "only make sense with --check"),
    ],
)
def test_measuring_options_are_cross_checked(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Options that cannot apply are refused with a usage error (exit 2)."""
    with pytest.raises(SystemExit) as exited:
        cli.parse_args(args)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("service", ["discard", "chargen", "info"])
def test_service_reset_by_the_server_is_reported(service: str) -> None:
    """A server resetting the connection gives the reset exit code and one line, no traceback."""

    def reset(conn: socket.socket) -> None:
        if service == "discard":
            conn.recv(echo_servers.RECV_SIZE)  # the client's first bytes
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    with serving(reset) as server:
        result = run_client(f"--service={service}", *at(server.port), "--size=1MiB")
    assert result.returncode == errors.EXIT_RESET, result.stderr
    assert result.stderr.startswith(f"Error: connection reset by 127.0.0.1:{server.port}")
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("version", "source", "destination", "family"),
    [
        ("v1", ("192.0.2.1", 1), ("198.51.100.2", 7080), "tcp4"),
        ("v2", ("192.0.2.1", 65535), ("198.51.100.2", 7080), "tcp4"),
        ("v1", ("2001:db8::1", 0), ("2001:db8::2", 7), "tcp6"),
        ("v2", ("2001:db8::1", 4000), ("::1", 7), "tcp6"),
        ("v2", ("2001:db8::1", 4000), ("127.0.0.1", 7), "tcp6"),  # destination of the other family
    ],
)
def test_proxy_headers_parse_in_epolld(
    version: str, source: tuple[str, int], destination: tuple[str, int], family: str
) -> None:
    """Each header the client builds is read back by the daemon's own parser."""
    header = proxy_header.build(version, source, destination)
    parsed = HeaderParser().feed(header + b"payload")
    assert parsed is not None
    assert parsed.rest == b"payload"
    assert (parsed.header.version, parsed.header.family) == (int(version[1]), family)
    assert parsed.header.source == source
    if destination[0] == "127.0.0.1":
        assert parsed.header.destination == ("::", 7)
    else:
        assert parsed.header.destination == destination
