"""Faults on TLS echo listeners and on discard, chargen and info listeners (issue 22),
through the real daemon (`python -m epolld` as a subprocess) in both trigger modes.

TLS: the faults apply to the plaintext echo (a close is close_notify then FIN; a reset
comes once the bytes have left). chargen: bandwidth shapes the stream, the byte limits
count bytes sent, delay delays its start. discard: the byte limits count bytes received.
info: delay delays the line, the byte limits cut it, reset_after before the line sends an
RST instead. UDP info: its reply is delayed. Timing checks are bounds that a slow machine
cannot break: a delay at least what was asked, never faster than rate plus one burst.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from epolld.config import Faults
from epolld.faults.shaper import BURST_BYTES
from epolld.services import pattern
from tests import tls_support as tls
from tests.epolld_process import WAIT_S, Daemon, write_config
from tests.traffic import connect, recv_exactly, recv_until_eof

pytestmark = pytest.mark.slow

RATE = 256 * 1024  # bytes per second
DELAY_S = 0.15
# host -> (service, tls, faults): one loopback address per listener
LISTENERS: dict[str, tuple[str, bool, Faults]] = {
    "127.0.0.11": ("chargen", False, Faults(bandwidth_bytes_per_s=RATE)),
    "127.0.0.12": ("chargen", False, Faults(close_after_bytes=10_000)),
    "127.0.0.13": ("chargen", False, Faults(reset_after_bytes=100_000)),
    "127.0.0.14": ("chargen", False, Faults(delay_s=DELAY_S)),
    "127.0.0.15": ("discard", False, Faults(close_after_bytes=5_000)),
    "127.0.0.16": ("discard", False, Faults(reset_after_bytes=5_000)),
    "127.0.0.17": ("info", False, Faults(delay_s=DELAY_S, jitter_s=0.01)),
    "127.0.0.18": ("info", False, Faults(close_after_bytes=20)),
    "127.0.0.19": ("info", False, Faults(delay_s=5.0, reset_after_s=0.1)),
    "127.0.0.21": ("echo", True, Faults(close_after_bytes=10_000)),
    "127.0.0.22": ("echo", True, Faults(reset_after_bytes=50_000)),
    "127.0.0.23": ("echo", True, Faults(delay_s=DELAY_S)),
    "127.0.0.24": ("echo", True, Faults(bandwidth_bytes_per_s=RATE)),
    "127.0.0.41": ("chargen", True, Faults(bandwidth_bytes_per_s=RATE)),
    "127.0.0.42": ("chargen", True, Faults(close_after_bytes=40_000)),
    "127.0.0.43": ("discard", True, Faults(close_after_bytes=5_000)),
    "127.0.0.44": ("discard", True, Faults(reset_after_bytes=5_000)),
    "127.0.0.45": ("info", True, Faults(delay_s=DELAY_S)),
    "udp:127.0.0.31": ("info", False, Faults(delay_s=DELAY_S)),
    "udp:127.0.0.32": ("info", False, Faults(drop=1.0)),
}


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tls.Certs:
    return tls.make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module", params=["level", "edge"])
def daemon(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, certs: tls.Certs
) -> Iterator[Daemon]:
    """One daemon per trigger mode serving every listener above."""
    listen = [
        {
            "address": f"{host}:0",
            "service": service,
            "faults": faults.active(),
            **({"tls": True} if on_tls else {}),
        }
        for host, (service, on_tls, faults) in LISTENERS.items()
    ]
    config = {
        "listen": listen,
        "trigger": request.param,
        "tls": {"certificate": str(certs.server.certificate), "key": str(certs.server.key)},
        "logging": {"level": "info", "connections": True},
        "stats_interval": "0s",
    }
    path = write_config(tmp_path_factory.mktemp("faults-services") / "epolld.yaml", config)
    started = Daemon(path)
    try:
        started.wait_for("listening", count=len(listen))
        yield started
    finally:
        started.stop()
    assert not started.bad_lines


def port_of(daemon: Daemon, host: str) -> int:
    for line in daemon.wait_for("listening"):
        if line["address"].rsplit(":", 1)[0] == host:
            return int(line["address"].rsplit(":", 1)[1])
    raise AssertionError(f"no listener on {host}")


def plain(daemon: Daemon, host: str) -> socket.socket:
    sock = connect(port_of(daemon, host), host)
    sock.settimeout(WAIT_S)
    return sock


def over_tls(daemon: Daemon, host: str) -> ssl.SSLSocket:
    """A TLS client that tells close_notify from a bare FIN (suppress_ragged_eofs off)."""
    context = tls.client_context()
    sock = connect(port_of(daemon, host), host)
    sock.settimeout(WAIT_S)
    return context.wrap_socket(sock, suppress_ragged_eofs=False)


def read_until_reset(sock: socket.socket, limit: int) -> bytes:
    """What arrives before the reset (none: the test fails)."""
    got = bytearray()
    try:
        while len(got) <= limit and (data := sock.recv(65536)):
            got += data
    except ConnectionResetError:
        return bytes(got)
    raise AssertionError(f"no reset after {len(got)} bytes")


def closed_line(daemon: Daemon, **match: Any) -> dict[str, Any]:
    """The connection_closed line with these fields (the test fails if none comes)."""
    return daemon.wait_for("connection_closed", **match)[-1]


# -- TLS echo --------------------------------------------------------------------------


def test_tls_close_after_bytes_gives_n_then_close_notify_and_fin(daemon: Daemon) -> None:
    """Exactly close_after_bytes of plaintext echo, then close_notify, then FIN."""
    payload = bytes(range(256)) * 80  # 20,480 bytes
    with over_tls(daemon, "127.0.0.21") as sock:
        sock.sendall(payload)
        got = bytearray()
        while data := sock.recv(65536):  # b"" only at close_notify: a bare FIN raises
            got += data
        assert bytes(got) == payload[:10_000]
        raw = sock.unwrap()  # our close_notify; the server's FIN follows its own
        assert raw.recv(100) == b""
    closed_line(daemon, reason="fault_close", bytes_out=10_000)


def test_tls_reset_after_bytes_gives_n_then_rst(daemon: Daemon) -> None:
    """Exactly reset_after_bytes of plaintext echo, then a reset. The client runs OpenSSL
    over memory buffers and reads the socket itself: ssl.SSLSocket reports a reset under
    OpenSSL 3 as an EOF."""
    payload = bytes(range(251)) * 220  # 55,220 bytes
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    session = tls.client_context().wrap_bio(incoming, outgoing)
    with plain(daemon, "127.0.0.22") as sock:
        while True:
            try:
                session.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                incoming.write(sock.recv(65536))
        session.write(payload)
        sock.sendall(outgoing.read())
        got = bytearray()

        def read_all() -> None:
            while data := sock.recv(65536):
                incoming.write(data)
                with contextlib.suppress(ssl.SSLWantReadError):
                    while True:
                        got.extend(session.read(65536))

        with pytest.raises(ConnectionResetError):
            read_all()
    assert bytes(got) == payload[:50_000]


def test_tls_delay_and_bandwidth_apply_to_the_plaintext(daemon: Daemon) -> None:
    """Each decrypted chunk comes back no sooner than the delay; the echo never runs
    faster than the bandwidth plus one burst."""
    with over_tls(daemon, "127.0.0.23") as sock:
        for i in range(3):
            started = time.monotonic()
            sock.sendall(b"%d" % i * 100)
            assert tls.recv_exactly(sock, 100) == b"%d" % i * 100
            assert time.monotonic() - started >= DELAY_S
    total = 192 * 1024
    started = time.monotonic()  # before accept, when the bucket starts full
    with over_tls(daemon, "127.0.0.24") as sock:
        got = 0
        for _ in range(total // 16384):
            sock.sendall(b"r" * 16384)
            chunk = tls.recv_exactly(sock, 16384)
            assert len(chunk) == 16384
            got += len(chunk)
            assert got <= BURST_BYTES + RATE * (time.monotonic() - started)


# -- chargen ----------------------------------------------------------------------------


def test_chargen_bandwidth_is_never_exceeded_beyond_one_burst(daemon: Daemon) -> None:
    """chargen's stream never outruns the bandwidth plus one burst; the pattern is intact."""
    total = 192 * 1024
    started = time.monotonic()  # before accept, when the bucket starts full
    with plain(daemon, "127.0.0.11") as sock:
        got = bytearray()
        while len(got) < total:
            data = sock.recv(65536)
            assert data
            got += data
            assert len(got) <= BURST_BYTES + RATE * (time.monotonic() - started)
    assert bytes(got) == pattern.expected(0, len(got))


def test_chargen_close_and_reset_after_bytes_sent(daemon: Daemon) -> None:
    """close_after_bytes: exactly N bytes of the pattern, then FIN; reset_after_bytes:
    exactly N, then a reset."""
    with plain(daemon, "127.0.0.12") as sock:
        assert recv_until_eof(sock) == pattern.expected(0, 10_000)
    closed_line(daemon, reason="fault_close", bytes_in=0, bytes_out=10_000)
    with plain(daemon, "127.0.0.13") as sock:
        assert read_until_reset(sock, 200_000) == pattern.expected(0, 100_000)


def test_chargen_delay_delays_the_start(daemon: Daemon) -> None:
    """The first byte comes no sooner than the delay after accept; then the pattern."""
    started = time.monotonic()
    with plain(daemon, "127.0.0.14") as sock:
        first = recv_exactly(sock, 1)
        assert time.monotonic() - started >= DELAY_S
        assert first + recv_exactly(sock, 9999) == pattern.expected(0, 10_000)


# -- discard ----------------------------------------------------------------------------


def test_discard_close_after_bytes_received(daemon: Daemon) -> None:
    """One byte short of close_after_bytes the connection stays; at N, FIN."""
    with plain(daemon, "127.0.0.15") as sock:
        sock.sendall(b"d" * 4_999)
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(1)
        sock.sendall(b"d")
        assert recv_until_eof(sock) == b""
    closed_line(daemon, reason="fault_close", bytes_in=5_000, bytes_out=0)


def test_discard_reset_after_bytes_received(daemon: Daemon) -> None:
    """One byte short of reset_after_bytes the connection stays; at N, a reset."""
    with plain(daemon, "127.0.0.16") as sock:
        sock.sendall(b"d" * 4_999)
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(1)
        sock.sendall(b"d")
        sock.settimeout(WAIT_S)
        assert read_until_reset(sock, 0) == b""


# -- info -------------------------------------------------------------------------------


def test_info_delay_delays_the_line(daemon: Daemon) -> None:
    """The line comes whole, no sooner than the delay, then FIN."""
    started = time.monotonic()
    with plain(daemon, "127.0.0.17") as sock:
        line = recv_until_eof(sock)
    assert time.monotonic() - started >= DELAY_S
    assert json.loads(line)["listener"].startswith("127.0.0.17:")


def test_info_close_after_bytes_cuts_the_line(daemon: Daemon) -> None:
    """close_after_bytes: the first N bytes of the line, then FIN."""
    with plain(daemon, "127.0.0.18") as sock:
        got = recv_until_eof(sock)
    assert len(got) == 20
    assert got.startswith(b"{")


def test_info_reset_after_before_the_line(daemon: Daemon) -> None:
    """reset_after shorter than the delay: an RST at that time, and no line."""
    started = time.monotonic()
    with plain(daemon, "127.0.0.19") as sock:
        assert read_until_reset(sock, 0) == b""
    elapsed = time.monotonic() - started
    assert 0.1 <= elapsed < 5.0


# -- discard, chargen and info over TLS ---------------------------------------------------


def tls_session(sock: socket.socket) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
    """A TLS client over memory buffers, handshake done: it sees a reset that ssl.SSLSocket
    reports as an EOF under OpenSSL 3."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    session = tls.client_context().wrap_bio(incoming, outgoing)
    while True:
        try:
            session.do_handshake()
            return session, incoming, outgoing
        except ssl.SSLWantReadError:
            sock.sendall(outgoing.read())
            incoming.write(sock.recv(65536))


def feed_until_eof(sock: socket.socket, incoming: ssl.MemoryBIO) -> None:
    """Hand what arrives to the TLS client until the EOF (a timeout or a reset raises)."""
    while data := sock.recv(65536):
        incoming.write(data)


def test_tls_chargen_bandwidth_is_never_exceeded_beyond_one_burst(daemon: Daemon) -> None:
    """The plaintext pattern never outruns the bandwidth plus one burst."""
    total = 192 * 1024
    started = time.monotonic()  # before accept, when the bucket starts full
    with over_tls(daemon, "127.0.0.41") as sock:
        got = bytearray()
        while len(got) < total:
            data = sock.recv(65536)
            assert data
            got += data
            assert len(got) <= BURST_BYTES + RATE * (time.monotonic() - started)
    assert bytes(got[:total]) == pattern.expected(0, total)


def test_tls_chargen_close_after_bytes_gives_n_then_close_notify(daemon: Daemon) -> None:
    """Exactly close_after_bytes of the pattern, then close_notify (a bare FIN raises),
    then FIN."""
    with over_tls(daemon, "127.0.0.42") as sock:
        got = bytearray()
        while data := sock.recv(65536):
            got += data
        assert bytes(got) == pattern.expected(0, 40_000)
        raw = sock.unwrap()
        assert raw.recv(100) == b""
    closed_line(daemon, reason="fault_close", bytes_in=0, bytes_out=40_000)


def test_tls_discard_close_after_bytes_received(daemon: Daemon) -> None:
    """One byte short of N plaintext received the connection stays; at N, close_notify
    and FIN."""
    with over_tls(daemon, "127.0.0.43") as sock:
        sock.sendall(b"d" * 4_999)
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(1)
        sock.settimeout(WAIT_S)
        sock.sendall(b"d")
        assert sock.recv(100) == b""  # close_notify: a bare FIN raises
        assert sock.unwrap().recv(100) == b""
    closed_line(daemon, reason="fault_close", bytes_in=5_000, bytes_out=0)


def test_tls_discard_reset_after_bytes_received(daemon: Daemon) -> None:
    """At N plaintext bytes received, a reset (no close_notify)."""
    with plain(daemon, "127.0.0.44") as sock:
        session, incoming, outgoing = tls_session(sock)
        session.write(b"d" * 4_999)
        sock.sendall(outgoing.read())
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):  # the session tickets at most: no EOF, no reset
            feed_until_eof(sock, incoming)
        sock.settimeout(WAIT_S)
        session.write(b"d")
        sock.sendall(outgoing.read())
        with pytest.raises(ConnectionResetError):
            feed_until_eof(sock, incoming)
        with pytest.raises(ssl.SSLWantReadError):  # records, perhaps, but no plaintext
            session.read(100)
    closed_line(daemon, reason="fault_reset", bytes_in=5_000)


def test_tls_info_delay_delays_the_line(daemon: Daemon) -> None:
    """The line comes whole, no sooner than the delay after the handshake, with the TLS
    session's fields, then close_notify."""
    with over_tls(daemon, "127.0.0.45") as sock:
        started = time.monotonic()
        got = bytearray()
        while data := sock.recv(65536):
            got += data
        assert time.monotonic() - started >= DELAY_S
    fields = json.loads(got)
    assert fields["listener"].startswith("127.0.0.45:")
    assert fields["tls"]["version"].startswith("TLSv1")


def test_udp_info_reply_is_delayed_or_dropped(daemon: Daemon) -> None:
    """UDP info with a delay: the reply comes no sooner than asked; with drop: 1, none
    comes, and each one dropped is counted."""
    port = port_of(daemon, "udp:127.0.0.31")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(WAIT_S)
        started = time.monotonic()
        sock.sendto(b"?" * 512, ("127.0.0.31", port))
        reply = sock.recv(2048)
        assert time.monotonic() - started >= DELAY_S
    assert json.loads(reply)["transport"] == "udp"
    before = stats(daemon).get("faults", {}).get("drop", 0)
    port = port_of(daemon, "udp:127.0.0.32")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _ in range(3):
            sock.sendto(b"?" * 512, ("127.0.0.32", port))
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(2048)
    assert stats(daemon)["faults"]["drop"] - before == 3


def stats(daemon: Daemon) -> dict[str, Any]:
    """The stats line SIGUSR1 asks for."""
    count = len(daemon.events("stats")) + 1
    daemon.signal(signal.SIGUSR1)
    return daemon.wait_for("stats", count=count)[-1]


# -- the restart handoff ------------------------------------------------------------------


def test_restart_handoff_carries_fault_service_connections(
    tmp_path: Path, certs: tls.Certs
) -> None:
    """SIGUSR2 during a shaped chargen stream and a delayed info line: both travel; the
    pattern goes on where it was, still within the bandwidth, and the line comes whole,
    no sooner than its delay. A TLS echo whose chunk waits for its delay cannot travel:
    the old process echoes it at once, then close_notify; a shaped TLS chargen stream
    ends with close_notify after an intact pattern."""
    chargen = Faults(bandwidth_bytes_per_s=RATE)
    late = Faults(delay_s=0.4)
    listen = [
        {"address": "127.0.0.61:0", "service": "chargen", "faults": chargen.active()},
        {"address": "127.0.0.62:0", "service": "info", "faults": late.active()},
        {"address": "127.0.0.63:0", "tls": True, "faults": {"delay": "5s"}},
        {"address": "127.0.0.64:0", "tls": True, "service": "chargen", "faults": chargen.active()},
    ]
    keys = {"certificate": str(certs.server.certificate), "key": str(certs.server.key)}
    daemon = Daemon(write_config(tmp_path / "epolld.yaml", {"listen": listen, "tls": keys}))
    try:
        daemon.wait_for("listening", count=4)
        started = time.monotonic()
        with (
            plain(daemon, "127.0.0.61") as stream,
            plain(daemon, "127.0.0.62") as line,
            over_tls(daemon, "127.0.0.63") as secure,
            over_tls(daemon, "127.0.0.64") as secure_stream,
        ):
            secure.sendall(b"waiting")
            got = bytearray(recv_exactly(stream, 100_000))
            daemon.signal(signal.SIGUSR2)
            assert daemon.wait_for("handoff_complete")[0]["connections"] == 2
            assert tls.recv_exactly(secure, 7) == b"waiting"
            assert secure.recv(100) == b""  # close_notify (a bare FIN would raise)
            # TLS chargen: what the old process generated, then close_notify.
            secure_got = bytearray()
            while data := secure_stream.recv(65536):
                secure_got += data
            assert bytes(secure_got) == pattern.expected(0, len(secure_got))
            assert time.monotonic() - started < 5.0
            while len(got) < 200_000:
                data = stream.recv(65536)
                assert data
                got += data
                # The next process's bucket starts full: one more burst.
                assert len(got) <= 2 * BURST_BYTES + RATE * (time.monotonic() - started)
            assert bytes(got) == pattern.expected(0, len(got))
            fields = json.loads(recv_until_eof(line))
            assert time.monotonic() - started >= late.delay_s
        assert fields["listener"].startswith("127.0.0.62:")
    finally:
        daemon.stop()
    assert not daemon.bad_lines
