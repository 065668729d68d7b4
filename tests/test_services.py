"""discard, chargen and info on a listener (issue 22): against the daemon as a real
subprocess, with Python sockets, ncat and socat, behind PROXY headers, over TLS, with
workers, across a reload that changes a listener's service and across the restart
handoff (SIGUSR2 re-executes in place).

Each listener gets an address of its own on 127.0.0.0/8 (port 0 twice on one address
is refused by the configuration), so one daemon serves every service at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from epolld.config import load_config, render_config
from epolld.errors import ConfigError
from epolld.services import pattern
from tests import tls_support as tls
from tests.epolld_process import WAIT_S, Daemon, write_config
from tests.test_proxy_parser import inet4, v2
from tests.traffic import recv_exactly, recv_until_eof

pytestmark = pytest.mark.slow

HOSTS = {"echo": "127.0.0.1", "discard": "127.0.0.2", "chargen": "127.0.0.3", "info": "127.0.0.4"}
UDP_HOSTS = {"discard": "127.0.0.5", "info": "127.0.0.6", "info6": "[::]"}
HIGH_WATER = 256 * 1024


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        daemon.stop()
        assert not daemon.bad_lines, f"log lines that are not JSON: {daemon.bad_lines[:5]}"


def _listen(**entry: Any) -> list[dict[str, Any]]:
    listen: list[dict[str, Any]] = [
        {"address": f"{host}:0", "service": service, **entry} for service, host in HOSTS.items()
    ]
    if not entry:
        listen += [
            {"address": f"udp:{host}:0", "service": service.removesuffix("6")}
            for service, host in UDP_HOSTS.items()
        ]
    return listen


def _start(
    tmp_path: Path, daemons: list[Daemon], listen: list[dict[str, Any]], **more: Any
) -> tuple[Daemon, dict[str, int]]:
    """The daemon and each listener's port by "service" (TCP) or "udp service"."""
    config = {
        "listen": listen,
        "buffers": {"high_water": HIGH_WATER, "low_water": HIGH_WATER // 4},
        "logging": {"level": "info", "connections": True},
        "stats_interval": "0s",
        **more,
    }
    daemon = Daemon(write_config(tmp_path / f"epolld-{len(daemons)}.yaml", config))
    daemons.append(daemon)
    ports: dict[str, int] = {}
    for entry in daemon.wait_for("listening", count=len(listen)):
        address = entry["address"]
        host = address.removeprefix("udp:").rsplit(":", 1)[0]
        udp = address.startswith("udp:")
        table = UDP_HOSTS if udp else HOSTS
        service = next(s for s, h in table.items() if h == host)
        ports[f"udp {service}" if udp else service] = int(address.rsplit(":", 1)[1])
    return daemon, ports


def _connect(ports: dict[str, int], service: str) -> socket.socket:
    sock = socket.create_connection((HOSTS[service], ports[service]), timeout=WAIT_S)
    sock.settimeout(WAIT_S)
    return sock


def _stats(daemon: Daemon) -> dict[str, Any]:
    count = len(daemon.events("stats"))
    daemon.signal(signal.SIGUSR1)
    return daemon.wait_for("stats", count=count + 1)[-1]


def _check_chargen(sock: socket.socket, offset: int, size: int) -> None:
    got = recv_exactly(sock, size)
    assert got == pattern.expected(offset, size), f"pattern broken after byte {offset}"


def _info(sock: socket.socket) -> dict[str, Any]:
    text = recv_until_eof(sock)
    assert text.endswith(b"\n"), text
    assert text.count(b"\n") == 1, text
    fields: dict[str, Any] = json.loads(text)
    return fields


# -- the configuration ---------------------------------------------------------------


def _load(tmp_path: Path, text: str) -> Any:
    path = tmp_path / "epolld.yaml"
    path.write_text(text)
    return load_config(str(path))


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            '{address: "udp:127.0.0.1:0", service: chargen}',
            ":3: listen[1].service: chargen over UDP is refused (it amplifies spoofed"
            " requests); 'udp:127.0.0.1:0' is UDP",
        ),
        (
            '{address: "127.0.0.1:0", service: daytime}',
            ":3: listen[1].service: expected one of echo, discard, chargen, info, got 'daytime'",
        ),
    ],
)
def test_service_errors_name_the_line(tmp_path: Path, entry: str, message: str) -> None:
    """A service that is unknown, or chargen on UDP, is refused at its line of the file."""
    with pytest.raises(ConfigError) as error:
        _load(tmp_path, f"listen:\n  - 127.0.0.9:0\n  - {entry}\n")
    assert str(error.value).endswith(message), str(error.value)


def test_metrics_endpoint_takes_no_service(tmp_path: Path) -> None:
    """metrics.listen serves HTTP: a service there is refused."""
    with pytest.raises(ConfigError, match=r"metrics\.listen\.service: the metrics endpoint"):
        _load(tmp_path, 'metrics:\n  listen: {address: "127.0.0.1:0", service: info}\n')


def test_print_config_shows_services_and_reads_back(tmp_path: Path) -> None:
    """--print-config writes each service, and the text loads back to the same listeners."""
    config = _load(
        tmp_path,
        "listen:\n  - 127.0.0.1:0\n  - {address: 127.0.0.2:0, service: discard}\n"
        "  - {address: udp:127.0.0.3:0, service: info}\n"
        "  - {address: 127.0.0.4:0, service: chargen, proxy_protocol: true}\n",
    )
    text = render_config(config)
    assert "service: discard" in text
    assert "service: chargen" in text
    again = _load(tmp_path, text)
    assert again.listen == config.listen
    assert [a.service for a in again.listen] == ["echo", "discard", "info", "chargen"]


# -- every service, both triggers, both io modes -------------------------------------


@pytest.mark.parametrize("io", ["copy", "splice"])
@pytest.mark.parametrize("trigger", ["level", "edge"])
def test_services(tmp_path: Path, daemons: list[Daemon], trigger: str, io: str) -> None:
    """discard drops and answers FIN with FIN; chargen sends the RFC pattern, goes on
    after the client's FIN and sends no faster than the client reads; info sends one
    JSON line then FIN; UDP info answers only requests at least as long as the reply;
    UDP discard answers nothing; the stats count each service's bytes."""
    daemon, ports = _start(tmp_path, daemons, _listen(), trigger=trigger, io=io)

    with _connect(ports, "discard") as sock:
        sock.sendall(b"d" * 1_000_000)
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == b""

    with _connect(ports, "chargen") as sock:
        first = rb"""!"#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\]^_`abcdefgh"""
        assert recv_exactly(sock, 74) == first + b"\r\n"  # RFC 864's first line
        _check_chargen(sock, 74, 300_000)
        sock.sendall(b"ignored\n")
        sock.shutdown(socket.SHUT_WR)  # as nc does at the end of its input
        _check_chargen(sock, 300_074, 300_000)
        # A client that stops reading stops the stream: only the kernel's buffers fill.
        time.sleep(0.5)
        before = _stats(daemon)["service_tcp_chargen_sent"]
        time.sleep(0.3)
        assert _stats(daemon)["service_tcp_chargen_sent"] == before
        assert before < 600_074 + 16 * 1024 * 1024  # socket buffers, nothing of ours

    with _connect(ports, "info") as sock:
        local = sock.getsockname()
        fields = _info(sock)
    assert fields["service"] == "info"
    assert fields["transport"] == "tcp"
    assert fields["pid"] == daemon.pid
    assert fields["worker"] is None
    assert fields["epolld"]
    assert fields["host"] == socket.gethostname()
    assert fields["listener"] == f"{HOSTS['info']}:{ports['info']}"
    assert fields["client"] == fields["peer"] == {"address": local[0], "port": local[1]}
    assert fields["local"] == {"address": HOSTS["info"], "port": ports["info"]}
    assert fields["proxy"] is None
    assert fields["tls"] is None

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(0.5)
        target = (UDP_HOSTS["info"], ports["udp info"])
        udp.sendto(b"?" * 16, target)  # shorter than the reply: dropped, counted
        with pytest.raises(TimeoutError):
            udp.recv(2048)
        udp.sendto(b"?" * 512, target)
        reply = udp.recv(2048)
        assert len(reply) <= 512
        compact = json.loads(reply)
        assert compact["client"]["port"] == udp.getsockname()[1]
        assert compact["transport"] == "udp"
        assert compact["pid"] == daemon.pid
        udp.sendto(b"?" * len(reply), target)  # exactly as long: answered
        assert udp.recv(2048) == reply
        udp.sendto(b"x" * 1000, (UDP_HOSTS["discard"], ports["udp discard"]))
        with pytest.raises(TimeoutError):
            udp.recv(2048)

    daemon.wait_for("connection_closed", count=2)
    stats = _stats(daemon)
    assert stats["service_tcp_discard_received"] == 1_000_000
    assert stats["service_tcp_discard_sent"] == 0
    assert stats["service_tcp_chargen_received"] == len(b"ignored\n")
    assert stats["service_tcp_info_sent"] >= 200
    assert stats["service_udp_discard_received"] == 1000
    assert stats["service_udp_info_sent"] == 2 * len(reply)
    assert stats["udp_dropped_info_short"] == 1


# -- ncat and socat ------------------------------------------------------------------


def _tool(command: list[str], data: bytes = b"", limit: int | None = None) -> bytes:
    """Run a client tool; with limit, read that much of its output and end it."""
    if limit is None:
        done = subprocess.run(command, input=data, capture_output=True, timeout=WAIT_S, check=True)
        return done.stdout
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdin is not None
        proc.stdin.close()  # the client's FIN: chargen goes on
        got = bytearray()
        while len(got) < limit and (chunk := proc.stdout.read(min(65536, limit - len(got)))):
            got += chunk
        return bytes(got)
    finally:
        proc.kill()
        proc.wait(WAIT_S)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


@pytest.mark.parametrize("trigger", ["level", "edge"])
def test_nc_ncat_and_socat(tmp_path: Path, daemons: list[Daemon], trigger: str) -> None:
    """ncat, socat and Debian's nc send to discard, read chargen's pattern (after closing their
    input) and print info's line, over TCP; socat gets UDP info's reply, also from a
    wildcard listener; the metrics endpoint counts the services' bytes."""
    tls.install_tools()
    if shutil.which("nc.openbsd") is None:
        subprocess.run([str(tls.APT_INSTALL), "netcat-openbsd"], check=True, timeout=600)
    metrics = {"listen": "127.0.0.9:0"}
    daemon, ports = _start(tmp_path, daemons, _listen(), trigger=trigger, metrics=metrics)
    d, c, i = (f"{HOSTS[s]}:{ports[s]}" for s in ("discard", "chargen", "info"))
    payload = b"to be dropped\n" * 10_000
    ncat = ["ncat", "--no-shutdown"]
    nc = "nc.openbsd"  # Debian's nc
    assert _tool(["ncat", "--send-only", *d.split(":")], payload) == b""
    assert _tool(["socat", "-u", "-", f"TCP:{d}"], payload) == b""
    assert _tool([nc, "-N", *d.split(":")], payload) == b""
    size = 200_000
    assert _tool([*ncat, *c.split(":")], limit=size) == pattern.expected(0, size)
    assert _tool(["socat", "-", f"TCP:{c}"], limit=size) == pattern.expected(0, size)
    assert _tool([nc, "-N", *c.split(":")], limit=size) == pattern.expected(0, size)
    for command in (
        ["ncat", "--recv-only", *i.split(":")],
        ["socat", "-u", f"TCP:{i}", "-"],
        [nc, "-d", *i.split(":")],
    ):
        assert json.loads(_tool(command))["service"] == "info"
    udp = f"{UDP_HOSTS['info']}:{ports['udp info']}"
    reply = _tool(["socat", "-T", "2", "-", f"UDP:{udp}"], b"x" * 511 + b"\n")
    assert json.loads(reply)["transport"] == "udp"
    wildcard = f"[::1]:{ports['udp info6']}"  # answered from the address it was sent to
    reply = _tool(["socat", "-T", "2", "-", f"UDP6:{wildcard}"], b"x" * 511 + b"\n")
    assert json.loads(reply)["client"]["address"] == "::1"
    daemon.wait_for("connection_closed", count=9)
    assert _stats(daemon)["service_tcp_discard_received"] == 3 * len(payload)
    scrape = daemon.wait_for("metrics_listening")[0]["address"]
    with urllib.request.urlopen(f"http://{scrape}/metrics", timeout=WAIT_S) as response:
        text = response.read().decode()
    line = 'epolld_service_bytes_total{direction="received",service="discard",transport="tcp"}'
    assert f"{line} {float(3 * len(payload))}" in text, text


# -- PROXY headers in front ---------------------------------------------------------------


@pytest.mark.parametrize("trigger", ["level", "edge"])
def test_behind_proxy_headers(tmp_path: Path, daemons: list[Daemon], trigger: str) -> None:
    """Behind a v1 or v2 header: info names the header's addresses and the proxy, discard
    drops what follows the header, chargen starts its pattern after the header."""
    daemon, ports = _start(tmp_path, daemons, _listen(proxy_protocol=True), trigger=trigger)
    v1 = b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 7\r\n"
    two = v2(addresses=inet4("203.0.113.9", "198.51.100.2", 41000, 8))
    cases = ((v1, 1, ("192.0.2.7", 40000)), (two, 2, ("203.0.113.9", 41000)))
    for header, version, source in cases:
        with _connect(ports, "info") as sock:
            sock.sendall(header)
            local = sock.getsockname()
            fields = _info(sock)
        assert fields["proxy"]["version"] == version
        assert fields["client"] == {"address": source[0], "port": source[1]}
        assert fields["proxy"]["source"] == fields["client"]
        assert fields["peer"] == {"address": local[0], "port": local[1]}  # the proxy
        with _connect(ports, "discard") as sock:
            sock.sendall(header + b"payload" * 1000)
            sock.shutdown(socket.SHUT_WR)
            assert recv_until_eof(sock) == b""
        with _connect(ports, "chargen") as sock:
            sock.sendall(header)
            _check_chargen(sock, 0, 100_000)
    daemon.wait_for("connection_closed", count=6)
    assert _stats(daemon)["service_tcp_discard_received"] == 2 * 7000


# -- TLS ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tls.Certs:
    return tls.make_certs(tmp_path_factory.mktemp("certs"))


@pytest.mark.parametrize("trigger", ["level", "edge"])
def test_over_tls(tmp_path: Path, daemons: list[Daemon], certs: tls.Certs, trigger: str) -> None:
    """Over TLS: info reports the version, cipher, SNI and client certificate subject;
    discard drops and closes with close_notify; chargen's pattern arrives intact."""
    section = {
        "certificate": str(certs.server.certificate),
        "key": str(certs.server.key),
        "client_ca": str(certs.ca.certificate),
    }
    listen = [e for e in _listen(tls=True) if e["service"] != "echo"]
    daemon, ports = _start(tmp_path, daemons, listen, trigger=trigger, tls=section)
    context = tls.client_context("1.3", certs, client=certs.client)
    with tls.tls_connect(ports["info"], context, sock=_connect(ports, "info")) as sock:
        fields = _info(sock)
    assert fields["tls"]["version"] == "TLSv1.3"
    assert fields["tls"]["cipher"].startswith("TLS_")
    assert fields["tls"]["sni"] == "localhost"
    assert "commonName=client.example" in fields["tls"]["client_subject"]
    older = tls.client_context("1.2", certs, client=certs.client)
    with tls.tls_connect(ports["info"], older, sock=_connect(ports, "info")) as sock:
        fields = _info(sock)
    assert fields["tls"]["version"] == "TLSv1.2"
    assert not fields["tls"]["cipher"].startswith("TLS_")
    with tls.tls_connect(ports["discard"], context, sock=_connect(ports, "discard")) as sock:
        sock.sendall(b"z" * 500_000)
        plain = sock.unwrap()  # our close_notify; the server answers with its own and FIN
        assert recv_until_eof(plain) == b""
    with tls.tls_connect(ports["chargen"], context, sock=_connect(ports, "chargen")) as sock:
        _check_chargen(sock, 0, 1_000_000)
    daemon.wait_for("connection_closed", count=4)
    assert _stats(daemon)["service_tcp_discard_received"] == 500_000


# -- workers, reload, the restart handoff ----------------------------------------------------


def test_workers(tmp_path: Path, daemons: list[Daemon]) -> None:
    """With two workers, info says which one answered, and every service serves."""
    daemon, ports = _start(tmp_path, daemons, _listen(), workers=2)
    daemon.wait_for("workers_ready")
    seen = set()
    for _ in range(40):
        with _connect(ports, "info") as sock:
            fields = _info(sock)
        seen.add(fields["worker"])
        if len(seen) == 2:
            break
    assert seen == {1, 2}
    with _connect(ports, "chargen") as sock:
        _check_chargen(sock, 0, 200_000)
    with _connect(ports, "discard") as sock:
        sock.sendall(b"w" * 10_000)
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == b""


def test_reload_changes_a_service(tmp_path: Path, daemons: list[Daemon]) -> None:
    """A reload changes a listener's service on the same socket: new connections get the
    new service, an open one keeps the one it started with."""
    address = f"{HOSTS['echo']}:0"
    daemon, ports = _start(tmp_path, daemons, [{"address": address}])
    port = ports["echo"]
    path = daemon.config_path
    old = _connect(ports, "echo")
    old.sendall(b"ping")
    assert recv_exactly(old, 4) == b"ping"
    for service in ("chargen", "info", "discard"):
        config = yaml.safe_load(path.read_text())
        config["listen"] = [{"address": f"{HOSTS['echo']}:{port}", "service": service}]
        write_config(path, config)
        count = len(daemon.events("config_reloaded"))
        daemon.signal(signal.SIGHUP)
        daemon.wait_for("config_reloaded", count=count + 1)
        with socket.create_connection((HOSTS["echo"], port), timeout=WAIT_S) as sock:
            if service == "chargen":
                _check_chargen(sock, 0, 10_000)
            elif service == "info":
                assert _info(sock)["listener"] == f"{HOSTS['echo']}:{port}"
            else:
                sock.sendall(b"gone")
                sock.shutdown(socket.SHUT_WR)
                assert recv_until_eof(sock) == b""
    old.sendall(b"still echo")
    assert recv_exactly(old, 10) == b"still echo"
    old.close()


def test_stop_ends_each_service_with_fin(tmp_path: Path, daemons: list[Daemon]) -> None:
    """SIGTERM: open chargen and discard connections get a FIN (chargen's pattern intact
    up to it), and the daemon exits 0 once their clients close."""
    daemon, ports = _start(tmp_path, daemons, _listen(), trigger="edge")
    chargen = _connect(ports, "chargen")
    discard = _connect(ports, "discard")
    _check_chargen(chargen, 0, 10_000)
    discard.sendall(b"q" * 1000)
    daemon.signal(signal.SIGTERM)
    rest = recv_until_eof(chargen)
    assert rest == pattern.expected(10_000, len(rest))
    assert recv_until_eof(discard) == b""
    chargen.close()
    discard.close()
    assert daemon.wait() == 0


@pytest.mark.parametrize("trigger", ["level", "edge"])
def test_handoff_carries_chargen_and_discard(
    tmp_path: Path, daemons: list[Daemon], trigger: str
) -> None:
    """SIGUSR2 re-executes in place: an open chargen stream goes on byte-exact where it
    was, an open discard connection keeps dropping and answers FIN with FIN, and the
    bytes they counted before carry on."""
    daemon, ports = _start(tmp_path, daemons, _listen(), trigger=trigger)
    chargen = _connect(ports, "chargen")
    discard = _connect(ports, "discard")
    _check_chargen(chargen, 0, 123_457)
    discard.sendall(b"a" * 50_000)
    time.sleep(0.2)  # let the daemon read it, and fill chargen's socket buffers
    daemon.signal(signal.SIGUSR2)
    complete = daemon.wait_for("handoff_complete")[0]
    assert complete["records"]["service_connection"] == 2, complete
    assert complete["connections"] == 2, complete
    _check_chargen(chargen, 123_457, 3_000_000)
    discard.sendall(b"b" * 50_000)
    discard.shutdown(socket.SHUT_WR)
    assert recv_until_eof(discard) == b""
    discard.close()
    with _connect(ports, "info") as sock:
        assert _info(sock)["pid"] == daemon.pid
    chargen.close()
    daemon.wait_for("connection_closed", count=2)
    stats = _stats(daemon)
    assert stats["service_tcp_discard_received"] == 100_000


# -- nmap ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _netns(name: str) -> Iterator[list[str]]:
    """A network namespace with only its loopback up; yields the prefix that runs in it."""
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield ["ip", "netns", "exec", name]
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def test_nmap_identifies_chargen_and_discard(tmp_path: Path, daemons: list[Daemon]) -> None:
    """nmap -sV names chargen by what it sends, and discard on its well-known port 9
    (in a network namespace of the test's own, so that ports 9 and 19 are free)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: a network namespace, and ports 9 and 19")
    if shutil.which("nmap") is None:
        subprocess.run([str(tls.APT_INSTALL), "nmap"], check=True, timeout=600)
    with _netns(f"epolld-svc-{os.getpid()}") as prefix:
        config = {
            "listen": [
                {"address": "127.0.0.1:9", "service": "discard"},
                {"address": "127.0.0.1:19", "service": "chargen"},
            ],
            "logging": {"level": "info"},
        }
        daemon = Daemon(write_config(tmp_path / "nmap.yaml", config), prefix=tuple(prefix))
        daemons.append(daemon)
        daemon.wait_for("listening", count=2)
        done = subprocess.run(
            [
                *prefix,
                "nmap",
                "-sV",
                "-Pn",
                "-n",
                "-p",
                "9,19",
                "--version-intensity",
                "0",
                "-T5",
                "127.0.0.1",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
    lines = {line.split()[0]: line for line in done.stdout.splitlines() if "/tcp" in line}
    assert "open" in lines["19/tcp"], done.stdout
    assert "chargen" in lines["19/tcp"], done.stdout
    assert "open" in lines["9/tcp"], done.stdout
    assert "discard" in lines["9/tcp"], done.stdout
