"""TLS echo against real TLS stacks: the daemon as a subprocess, certificates made by
openssl in tmp_path, clients from OpenSSL (s_client, socat, ncat, Python's ssl) and
GnuTLS (gnutls-cli) on loopback (issue 21)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import tls_support as tls
from tests.epolld_process import Daemon, write_config

PAYLOAD_BYTES = 1024 * 1024


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tls.Certs:
    return tls.make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        print(daemon.tail(40))  # shown when the test failed
        daemon.stop()
        assert not daemon.bad_lines, f"log lines that are not JSON: {daemon.bad_lines[:5]}"


def _start(
    tmp_path: Path,
    daemons: list[Daemon],
    certs: tls.Certs,
    *,
    listen: list[Any] | None = None,
    tls_section: dict[str, Any] | None = None,
    **more: Any,
) -> Daemon:
    config = {
        "listen": listen or [{"address": "127.0.0.1:0", "tls": True}],
        "tls": {
            "certificate": str(certs.server.certificate),
            "key": str(certs.server.key),
            **(tls_section or {}),
        },
        "logging": {"level": "info", "connections": True},
        **more,
    }
    path = write_config(tmp_path / f"epolld-{len(daemons)}.yaml", config)
    daemon = Daemon(path)
    daemons.append(daemon)
    daemon.wait_for("listening", count=len(config["listen"]))
    return daemon


def _port(daemon: Daemon, index: int = 0) -> int:
    return int(daemon.wait_for("listening")[index]["address"].rsplit(":", 1)[1])


def _peer_certificate(sock: ssl.SSLSocket) -> bytes:
    der = sock.getpeercert(binary_form=True)
    assert der is not None
    return der


def _der(pair: tls.Pair) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pair.certificate.read_text())


# --- every client echoes 1 MiB byte-exact over TLS 1.2 and 1.3 ----------------------------


@pytest.fixture(scope="module")
def tools() -> None:
    tls.install_tools()


@pytest.mark.parametrize("version", ["1.2", "1.3"])
@pytest.mark.parametrize("tool", ["openssl", "gnutls-cli", "socat", "ncat"])
def test_cli_clients_echo_a_mebibyte(
    tmp_path: Path,
    daemons: list[Daemon],
    certs: tls.Certs,
    tools: None,
    tool: str,
    version: str,
) -> None:
    """openssl s_client, gnutls-cli, socat OPENSSL: and ncat --ssl each get 1 MiB of random
    bytes echoed byte-exact, over the TLS version asked for."""
    daemon = _start(
        tmp_path, daemons, certs, tls_section={"min_version": "1.3"} if version == "1.3" else {}
    )
    env = dict(os.environ)
    if version == "1.2":
        env["OPENSSL_CONF"] = str(tls.max_tls12_conf(tmp_path))
    payload = os.urandom(PAYLOAD_BYTES)
    got = tls.echo_through_tool(tls.tool_command(tool, _port(daemon), version), payload, env)
    assert len(got) == len(payload)
    assert got == payload
    established = daemon.wait_for("tls_established")[0]
    assert established["version"] == f"TLSv{version}"
    assert established["cipher"]


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_the_client_s_order_of_cipher_suites_wins(
    tmp_path: Path, daemons: list[Daemon], certs: tls.Certs, tools: None, version: str
) -> None:
    """A client that lists AES-128-GCM before AES-256-GCM gets AES-128-GCM (Mozilla's
    intermediate profile), and one that lists them the other way round gets AES-256-GCM:
    the server imposes no order of its own."""
    daemon = _start(tmp_path, daemons, certs)
    suites = {
        "1.2": ("ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384"),
        "1.3": ("TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384"),
    }[version]
    for order in (suites, suites[::-1]):
        option = "-cipher" if version == "1.2" else "-ciphersuites"
        command = ["openssl", "s_client", "-connect", f"127.0.0.1:{_port(daemon)}",
                   f"-tls{version.replace('.', '_')}", option, ":".join(order)]  # fmt: skip
        if version == "1.2":
            command += ["-ciphersuites", ""]  # no TLS 1.3 suites: only the 1.2 list counts
        result = subprocess.run(
            command, input=b"", capture_output=True, timeout=tls.WAIT_S, check=False
        )
        assert result.returncode == 0, result.stderr.decode()[-400:]
        assert f"Cipher is {order[0]}" in result.stdout.decode()
    ciphers = [e["cipher"] for e in daemon.wait_for("tls_established", count=2)]
    assert ciphers == [suites[0], suites[1]]


@pytest.mark.parametrize("trigger", ["level", "edge"])
@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_python_client_echoes_a_mebibyte_and_closes_cleanly(
    tmp_path: Path, daemons: list[Daemon], certs: tls.Certs, trigger: str, version: str
) -> None:
    """Python's ssl gets 1 MiB echoed byte-exact in both triggers (io: splice copies on a
    TLS listener); its close_notify is answered with epolld's close_notify and a FIN."""
    daemon = _start(tmp_path, daemons, certs, trigger=trigger, io="splice")
    payload = os.urandom(PAYLOAD_BYTES)
    with tls.tls_connect(_port(daemon), tls.client_context(version, certs)) as sock:
        assert sock.version() == f"TLSv{version}"
        assert _peer_certificate(sock) == _der(certs.server)
        assert tls.echo_python(sock, payload) == payload
        raw = sock.unwrap()  # our close_notify, then epolld's
        assert raw.recv(1) == b""  # then its FIN
        raw.close()
    closed = daemon.wait_for("connection_closed")[0]
    assert closed["bytes_in"] == closed["bytes_out"] == PAYLOAD_BYTES
    assert closed["reason"] == "eof"


def test_plain_and_tls_listeners_side_by_side_and_a_fin_without_close_notify(
    tmp_path: Path, daemons: list[Daemon], certs: tls.Certs
) -> None:
    """A plain listener beside a TLS one echoes in clear; a TLS client that sends a FIN
    without close_notify gets its echo, and the session is logged as truncated."""
    daemon = _start(
        tmp_path,
        daemons,
        certs,
        listen=["127.0.0.2:0", {"address": "127.0.0.1:0", "tls": True}],
    )
    with socket.create_connection(("127.0.0.2", _port(daemon, 0)), timeout=10) as plain:
        plain.sendall(b"clear")
        assert tls.recv_exactly(plain, 5) == b"clear"
    sock = tls.tls_connect(_port(daemon, 1), tls.client_context(None, certs))
    sock.sendall(b"secret")
    assert tls.recv_exactly(sock, 6) == b"secret"
    sock.shutdown(socket.SHUT_WR)  # a FIN, no close_notify
    daemon.wait_for("tls_truncated")
    closed = daemon.wait_for("connection_closed", reason="truncated")[0]
    assert closed["bytes_in"] == 6
    sock.close()


# --- mutual TLS, SNI --------------------------------------------------------------------


def test_mutual_tls_accepts_a_signed_client_only(
    tmp_path: Path, daemons: list[Daemon], certs: tls.Certs
) -> None:
    """With client_ca, a client certificate the CA signed is echoed (its subject logged);
    a self-signed one and none at all fail the handshake, unechoed, counted by reason."""
    daemon = _start(
        tmp_path,
        daemons,
        certs,
        listen=[{"address": "127.0.0.1:0", "tls": {"client_ca": str(certs.ca.certificate)}}],
        metrics={"listen": "127.0.0.1:0"},
    )
    port = _port(daemon)
    with tls.tls_connect(port, tls.client_context("1.3", certs, certs.client)) as sock:
        assert tls.echo_python(sock, b"signed") == b"signed"
    established = daemon.wait_for("tls_established")[0]
    assert "CN=client.example" in established["client_subject"]
    for client, reason in (
        (certs.stranger, "bad_client_certificate"),
        (None, "no_client_certificate"),
    ):
        for version in ("1.2", "1.3"):
            with pytest.raises((ssl.SSLError, ConnectionError)):
                _refused_echo(port, tls.client_context(version, certs, client))
        daemon.wait_for("tls_handshake_failed", reason=reason)
    metrics_port = int(daemon.wait_for("metrics_listening")[0]["address"].rsplit(":", 1)[1])
    page = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read()
    text = page.decode()
    assert 'epolld_tls_handshakes_total{result="success"} 1.0' in text
    assert 'epolld_tls_handshakes_total{result="failure"} 4.0' in text
    assert 'epolld_tls_handshake_failures_total{reason="bad_client_certificate"} 2.0' in text
    assert 'epolld_tls_handshake_failures_total{reason="no_client_certificate"} 2.0' in text
    assert "epolld_tls_handshake_duration_seconds_count 1.0" in text
    assert "epolld_tls_certificate_expiry_seconds{certificate=" in text


def _refused_echo(port: int, context: ssl.SSLContext) -> None:
    """Raise as a refused client does: at the handshake (TLS 1.2), or at the first read,
    where TLS 1.3 reports the server's alert (the client's side finished first)."""
    with tls.tls_connect(port, context) as sock:
        sock.sendall(b"refused")
        if sock.recv(100) == b"":
            raise ConnectionError("closed without echo")
        raise AssertionError("echoed to a refused client")


def test_sni_picks_the_certificate(tmp_path: Path, daemons: list[Daemon], certs: tls.Certs) -> None:
    """A client naming an SNI entry's name gets that entry's certificate (wildcards too);
    another name, or none, gets the default one."""
    sni = [
        {
            "names": ["other.example", "*.wild.example"],
            "certificate": str(certs.other.certificate),
            "key": str(certs.other.key),
        }
    ]
    daemon = _start(tmp_path, daemons, certs, tls_section={"sni": sni})
    port = _port(daemon)
    context = tls.client_context()
    for name, expected in (
        ("other.example", certs.other),
        ("x.wild.example", certs.other),
        ("y.x.wild.example", certs.server),
        ("localhost", certs.server),
        (None, certs.server),
    ):
        with tls.tls_connect(port, context, server_name=name) as sock:
            assert _peer_certificate(sock) == _der(expected), name
            assert tls.echo_python(sock, b"sni") == b"sni"
    logged = daemon.wait_for("tls_established", count=5)
    assert [e["sni"] for e in logged] == [
        "other.example",
        "x.wild.example",
        "y.x.wild.example",
        "localhost",
        None,
    ]


# --- reload -------------------------------------------------------------------------------


@pytest.mark.parametrize("trigger", ["level", "edge"])
def test_reload_swaps_the_certificate_and_a_broken_one_changes_nothing(
    tmp_path: Path, daemons: list[Daemon], certs: tls.Certs, trigger: str
) -> None:
    """SIGHUP re-reads the files: new handshakes get the new certificate while an open
    connection keeps echoing; a broken certificate refuses the reload, naming the file,
    and the previous certificate is served on."""
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "cert.pem", live / "key.pem"
    shutil.copy(certs.server.certificate, cert)
    shutil.copy(certs.server.key, key)
    config = {
        "listen": [{"address": "127.0.0.1:0", "tls": True}],
        "trigger": trigger,
        "tls": {"certificate": str(cert), "key": str(key)},
        "logging": {"level": "info"},
    }
    daemon = Daemon(write_config(tmp_path / "epolld.yaml", config))
    daemons.append(daemon)
    port = _port(daemon)
    context = tls.client_context()
    with tls.tls_connect(port, context) as kept:
        assert tls.echo_python(kept, b"before") == b"before"
        shutil.copy(certs.other.certificate, cert)
        shutil.copy(certs.other.key, key)
        daemon.signal(signal.SIGHUP)
        daemon.wait_for("config_reloaded")
        with tls.tls_connect(port, context) as fresh:
            assert _peer_certificate(fresh) == _der(certs.other)
        assert tls.echo_python(kept, b"during") == b"during"
        cert.write_text("not a certificate\n")
        daemon.signal(signal.SIGHUP)
        failed = daemon.wait_for("config_reload_failed")[0]
        assert str(cert) in failed["error"]
        with tls.tls_connect(port, context) as fresh:
            assert _peer_certificate(fresh) == _der(certs.other)
        assert tls.echo_python(kept, b"after") == b"after"
        assert _peer_certificate(kept) == _der(certs.server)


@pytest.mark.parametrize("problem", ["expired", "not_yet_valid"])
def test_a_certificate_outside_its_dates_is_served_with_a_warning(
    tmp_path: Path, daemons: list[Daemon], certs: tls.Certs, problem: str
) -> None:
    """An expired or not-yet-valid certificate starts and serves (clients are tested
    against such), with a warning at start and again at reload."""
    make = tls.make_expired if problem == "expired" else tls.make_not_yet_valid
    expired = make(tmp_path)
    daemon = _start(
        tmp_path,
        daemons,
        certs,
        tls_section={"certificate": str(expired.certificate), "key": str(expired.key)},
    )
    warning = daemon.wait_for("tls_certificate_not_valid")[0]
    assert warning["certificate"] == str(expired.certificate)
    assert warning["problem"] == problem
    with tls.tls_connect(_port(daemon), tls.client_context()) as sock:
        assert _peer_certificate(sock) == _der(expired)
        assert tls.echo_python(sock, b"stale") == b"stale"
    daemon.signal(signal.SIGHUP)
    daemon.wait_for("config_reloaded")
    daemon.wait_for("tls_certificate_not_valid", count=2)


# --- workers, PROXY ---------------------------------------------------------------------


def test_workers_serve_tls_and_reload_reaches_every_worker(
    tmp_path: Path, daemons: list[Daemon], certs: tls.Certs
) -> None:
    """With workers: 2, TLS connections are echoed by whichever worker the kernel picks,
    the supervisor's metrics sum their handshakes, and a reload's certificate reaches
    every worker."""
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "cert.pem", live / "key.pem"
    shutil.copy(certs.server.certificate, cert)
    shutil.copy(certs.server.key, key)
    daemon = _start(
        tmp_path,
        daemons,
        certs,
        tls_section={"certificate": str(cert), "key": str(key)},
        workers=2,
        metrics={"listen": "127.0.0.1:0"},
    )
    daemon.wait_for("worker_ready", count=2, timeout=20)
    port = _port(daemon)
    context = tls.client_context()
    connections = 8
    for _ in range(connections):
        with tls.tls_connect(port, context) as sock:
            payload = os.urandom(64 * 1024)
            assert tls.echo_python(sock, payload) == payload
    shutil.copy(certs.other.certificate, cert)
    shutil.copy(certs.other.key, key)
    daemon.signal(signal.SIGHUP)
    daemon.wait_for("config_reloaded", count=2)  # in both workers
    daemon.wait_for("workers_reloaded")
    for _ in range(connections):
        with tls.tls_connect(port, context) as sock:
            assert _peer_certificate(sock) == _der(certs.other)
    metrics_port = int(daemon.wait_for("metrics_listening")[0]["address"].rsplit(":", 1)[1])
    expected = f'epolld_tls_handshakes_total{{result="success"}} {2 * connections}.0'
    deadline = time.monotonic() + 10
    while True:  # the workers report their counters with their heartbeat (<= 1 s)
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        if expected in text or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert expected in text
    assert f'epolld_tls_certificate_expiry_seconds{{certificate="{cert}"}}' in text


def test_proxy_header_then_tls(tmp_path: Path, daemons: list[Daemon], certs: tls.Certs) -> None:
    """Behind proxy_protocol the PROXY header comes first, then the ClientHello; the
    client's address is the header's, and its per-IP limit applies to that address."""
    daemon = _start(
        tmp_path,
        daemons,
        certs,
        listen=[{"address": "127.0.0.1:0", "tls": True, "proxy_protocol": True}],
        limits={"max_connections_per_ip": 1},
    )
    port = _port(daemon)
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    raw.sendall(b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 7443\r\n")
    with tls.tls_connect(port, tls.client_context(None, certs), sock=raw) as sock:
        assert tls.echo_python(sock, b"proxied") == b"proxied"
        assert daemon.wait_for("tls_established")[0]["peer"] == "192.0.2.7:40000"
        second = socket.create_connection(("127.0.0.1", port), timeout=10)
        second.sendall(b"PROXY TCP4 192.0.2.7 127.0.0.1 40001 7443\r\n")
        assert second.recv(100) == b""  # over the limit for 192.0.2.7
        second.close()
        daemon.wait_for("connection_refused", limit="max_connections_per_ip")


def _v2_header(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A PROXY v2 header for TCP over IPv4 (HAProxy's proxy-protocol.txt, section 2.2)."""
    addresses = socket.inet_aton(source[0]) + socket.inet_aton(destination[0])
    ports = source[1].to_bytes(2, "big") + destination[1].to_bytes(2, "big")
    return b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c" + addresses + ports


class _BioClient:
    """A TLS client over memory BIOs on a plain socket, so that a test decides what goes
    into each send(): here the PROXY header and the ClientHello in one segment."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        context = tls.client_context()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")

    def handshake(self, prefix: bytes) -> None:
        """Handshake, sending prefix in the same send() as the ClientHello."""
        while True:
            try:
                self.tls.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            out = prefix + self.outgoing.read()
            prefix = b""
            if out:
                self.sock.sendall(out)
            if done:
                return
            self._receive()

    def _receive(self) -> None:
        data = self.sock.recv(65536)
        assert data, "the server closed during the handshake"
        self.incoming.write(data)

    def echo(self, payload: bytes) -> bytes:
        self.tls.write(payload)
        self.sock.sendall(self.outgoing.read())
        got = b""
        while len(got) < len(payload):
            try:
                got += self.tls.read(65536)
            except ssl.SSLWantReadError:
                self._receive()
        return got


@pytest.mark.parametrize("trigger", ["level", "edge"])
@pytest.mark.parametrize("version", [1, 2])
def test_proxy_header_and_client_hello_in_one_segment(
    tmp_path: Path, daemons: list[Daemon], certs: tls.Certs, trigger: str, version: int
) -> None:
    """A proxy that sends its PROXY header (v1 or v2) and the ClientHello in one segment:
    the header reader takes only the header, OpenSSL finds the ClientHello behind it in
    the kernel, in both trigger modes, and the header's address names the client."""
    daemon = _start(
        tmp_path,
        daemons,
        certs,
        trigger=trigger,
        listen=[{"address": "127.0.0.1:0", "tls": True, "proxy_protocol": True}],
    )
    source, destination = ("192.0.2.9", 40009), ("127.0.0.1", 7443)
    if version == 1:
        header = b"PROXY TCP4 192.0.2.9 127.0.0.1 40009 7443\r\n"
    else:
        header = _v2_header(source, destination)
    with socket.create_connection(("127.0.0.1", _port(daemon)), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client = _BioClient(sock)
        client.handshake(header)
        payload = os.urandom(100_000)
        assert client.echo(payload) == payload
        established = daemon.wait_for("tls_established")[0]
        assert established["peer"] == "192.0.2.9:40009"


# --- hostile and slow peers ---------------------------------------------------------------


def _client_hello() -> bytes:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = tls.client_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


def test_garbage_trickle_and_stall_are_closed_within_the_handshake_timeout(
    tmp_path: Path, daemons: list[Daemon], certs: tls.Certs
) -> None:
    """Garbage is closed at once; a ClientHello one byte at a time and a silent peer are
    closed within handshake_timeout; none is echoed, each is counted by reason."""
    daemon = _start(tmp_path, daemons, certs, tls_section={"handshake_timeout": "1s"})
    port = _port(daemon)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n" * 10)
        reply = b"".join(iter(lambda: sock.recv(4096), b""))
        assert b"GET" not in reply
    daemon.wait_for("tls_handshake_failed", reason="not_tls")
    hello = _client_hello()
    trickle = socket.create_connection(("127.0.0.1", port), timeout=10)
    silent = socket.create_connection(("127.0.0.1", port), timeout=10)
    started = time.monotonic()
    closed_at = None
    for byte in hello:
        try:
            trickle.sendall(bytes([byte]))
        except OSError:
            closed_at = time.monotonic()
            break
        time.sleep(0.02)
        if time.monotonic() - started > 5:
            break
    assert silent.recv(100) == b""
    assert trickle.recv(100) == b""
    assert (closed_at or time.monotonic()) - started < 5
    timeouts = [e for e in daemon.events("connection_closed") if e.get("error") == "timeout"]
    assert len(timeouts) == 2
    assert all(e["bytes_out"] == 0 for e in timeouts)
    trickle.close()
    silent.close()


def test_an_old_version_and_no_shared_cipher_fail_the_handshake(
    tmp_path: Path, daemons: list[Daemon], certs: tls.Certs
) -> None:
    """A TLS 1.2 client on a min_version 1.3 listener, and a client offering only RSA
    suites to an ECDSA certificate, fail their handshakes, counted by reason."""
    daemon = _start(
        tmp_path,
        daemons,
        certs,
        listen=[
            {"address": "127.0.0.1:0", "tls": {"min_version": "1.3"}},
            {"address": "127.0.0.2:0", "tls": True},
        ],
    )
    with pytest.raises(ssl.SSLError):
        tls.tls_connect(_port(daemon, 0), tls.client_context("1.2"))
    daemon.wait_for("tls_handshake_failed", reason="unsupported_version")
    rsa_only = tls.client_context("1.2")
    rsa_only.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256")
    raw = socket.create_connection(("127.0.0.2", _port(daemon, 1)), timeout=10)
    with pytest.raises(ssl.SSLError):
        tls.tls_connect(0, rsa_only, sock=raw)
    daemon.wait_for("tls_handshake_failed", reason="no_shared_cipher")


@pytest.mark.parametrize("trigger", ["level", "edge"])
def test_a_client_that_writes_without_reading_stays_bounded(
    tmp_path: Path, daemons: list[Daemon], certs: tls.Certs, trigger: str
) -> None:
    """A TLS client that sends and never reads pauses its reading at high_water: the
    daemon's memory stays bounded while the client's sends block; once the client reads,
    every byte comes back."""
    daemon = _start(
        tmp_path,
        daemons,
        certs,
        trigger=trigger,
        buffers={"high_water": "256KiB", "low_water": "64KiB"},
    )
    sock = tls.tls_connect(_port(daemon), tls.client_context(None, certs))
    before = daemon.rss_bytes()
    sock.settimeout(2.0)
    sent = 0
    chunk = os.urandom(64 * 1024)
    try:
        while sent < 256 * 1024 * 1024:
            sent += sock.send(chunk)
    except (TimeoutError, ssl.SSLError):
        pass
    assert sent < 256 * 1024 * 1024  # it blocked: epolld stopped reading
    assert daemon.rss_bytes() - before < 32 * 1024 * 1024
    sock.settimeout(tls.WAIT_S)
    got = 0
    while got < sent:  # reading resumes the echo: everything sent comes back
        chunk = sock.recv(65536)
        assert chunk
        got += len(chunk)
    assert got == sent
    sock.close()


# --- SIGTERM and the restart handoff --------------------------------------------------


@pytest.mark.parametrize("trigger", ["level", "edge"])
def test_sigterm_drains_with_close_notify_and_fin(
    tmp_path: Path, daemons: list[Daemon], certs: tls.Certs, trigger: str
) -> None:
    """SIGTERM echoes what a TLS client sent, then sends close_notify and a FIN."""
    daemon = _start(tmp_path, daemons, certs, trigger=trigger)
    sock = tls.tls_connect(_port(daemon), tls.client_context(None, certs))
    assert tls.echo_python(sock, b"first") == b"first"
    sock.sendall(b"last words")
    time.sleep(0.2)
    daemon.signal(signal.SIGTERM)
    assert tls.recv_exactly(sock, 10) == b"last words"
    assert sock.recv(100) == b""  # close_notify (a truncated stream would raise)
    raw = socket.socket(fileno=os.dup(sock.fileno()))
    raw.settimeout(10)
    assert raw.recv(100) == b""  # and the FIN
    raw.close()
    sock.close()  # the daemon lingers until the client closes
    assert daemon.wait() == 0


@pytest.mark.parametrize("trigger", ["level", "edge"])
def test_restart_handoff_closes_tls_cleanly_and_plain_travels(
    tmp_path: Path, daemons: list[Daemon], certs: tls.Certs, trigger: str
) -> None:
    """SIGUSR2 (re-exec without systemd): a TLS connection gets what it sent echoed, then
    close_notify and FIN; a plain connection goes on in the new process; the TLS listener
    travels and serves TLS there."""
    daemon = _start(
        tmp_path,
        daemons,
        certs,
        trigger=trigger,
        listen=["127.0.0.2:0", {"address": "127.0.0.1:0", "tls": True}],
    )
    plain_port, tls_port = _port(daemon, 0), _port(daemon, 1)
    plain = socket.create_connection(("127.0.0.2", plain_port), timeout=10)
    plain.sendall(b"plain")
    assert tls.recv_exactly(plain, 5) == b"plain"
    sock = tls.tls_connect(tls_port, tls.client_context(None, certs))
    assert tls.echo_python(sock, b"hello") == b"hello"
    sock.sendall(b"in flight")
    time.sleep(0.2)
    daemon.signal(signal.SIGUSR2)
    assert tls.recv_exactly(sock, 9) == b"in flight"
    assert sock.recv(100) == b""  # close_notify
    complete = daemon.wait_for("handoff_complete")[0]
    assert complete["connections"] == 1
    assert complete["records"].get("tls_closing") == 1
    plain.sendall(b"still here")
    assert tls.recv_exactly(plain, 10) == b"still here"
    with tls.tls_connect(tls_port, tls.client_context(None, certs)) as fresh:
        assert tls.echo_python(fresh, b"new process") == b"new process"
    assert daemon.proc.poll() is None
    plain.close()
    sock.close()


def test_restart_waits_a_bounded_time_for_a_tls_client_that_does_not_read(
    tmp_path: Path, daemons: list[Daemon], certs: tls.Certs
) -> None:
    """A TLS client that stopped reading holds its echo in OpenSSL, which cannot travel:
    the old process waits for its socket within a bound (0.3 s), then hands over; the new
    process is ready at once and serves TLS, and the stuck client is closed."""
    daemon = _start(
        tmp_path, daemons, certs, buffers={"high_water": "256KiB", "low_water": "64KiB"}
    )
    port = _port(daemon)
    stuck = tls.tls_connect(port, tls.client_context(None, certs))
    stuck.settimeout(1.0)
    chunk = os.urandom(64 * 1024)
    with contextlib.suppress(TimeoutError, ssl.SSLError):
        for _ in range(4096):  # until epolld stops reading (backpressure)
            stuck.sendall(chunk)
    started = time.monotonic()
    daemon.signal(signal.SIGUSR2)
    complete = daemon.wait_for("handoff_complete")[0]
    assert time.monotonic() - started < 3.0  # the re-exec and start-up, plus at most 0.3 s
    assert complete["records"].get("tls_closing") == 1
    with tls.tls_connect(port, tls.client_context(None, certs)) as fresh:
        assert tls.echo_python(fresh, b"after the restart") == b"after the restart"
    stuck.settimeout(tls.WAIT_S)
    with contextlib.suppress(OSError):  # the tail of the echo, then no close_notify
        while stuck.recv(65536):
            pass
    stuck.close()


@pytest.mark.parametrize("trigger", ["level", "edge"])
def test_a_read_buffer_smaller_than_a_record(
    tmp_path: Path, daemons: list[Daemon], certs: tls.Certs, trigger: str
) -> None:
    """With buffers.read_size below a TLS record's 16 KiB, a record is decrypted in
    several reads (the rest waits in OpenSSL, not in the kernel, so no event says so):
    1 MiB is still echoed byte-exact."""
    daemon = _start(tmp_path, daemons, certs, trigger=trigger, buffers={"read_size": "1KiB"})
    payload = os.urandom(PAYLOAD_BYTES)
    with tls.tls_connect(_port(daemon), tls.client_context(None, certs)) as sock:
        assert tls.echo_python(sock, payload) == payload
