"""Property test: hostile handshakes against a running daemon's TLS listener (issue 21).

Peers send random bytes, a real ClientHello (captured from Python's ssl over MemoryBIOs)
mutated or truncated, or such bytes one at a time, then half-close. The daemon must not
crash (a good TLS client is served afterwards, no loop_crashed, handler_bug or traceback in
its log), must never echo to a peer that did not finish a handshake (what comes back is
TLS records only, never the bytes sent), and must stay bounded in memory, also with many
peers stalled mid-handshake at once. Derandomized, no example database, ~20 s.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import ssl
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import tls_support as tls
from tests.epolld_process import Daemon, write_config

EXAMPLES = 150
STALLED_PEERS = 200
MEMORY_BOUND_BYTES = 16 * 1024 * 1024  # above the RSS after warming up
READ_TIMEOUT_S = 3.0  # more than handshake_timeout: the daemon closes first
TLS_RECORD_TYPES = {20, 21, 22, 23}  # change_cipher_spec, alert, handshake, application_data


def client_hello(server_name: str = "localhost") -> bytes:
    """The first flight of a real TLS client (Python's ssl), without any socket."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    sslobj = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):  # it waits for the ServerHello
        sslobj.do_handshake()
    return outgoing.read()


HELLO = client_hello()


@st.composite
def mutated_hello(draw: st.DrawFn) -> bytes:
    """The ClientHello with a few bytes flipped, inserted or deleted."""
    data = bytearray(HELLO)
    for _ in range(draw(st.integers(1, 8))):
        at = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "insert", "delete"]))
        if action == "flip":
            data[at] ^= draw(st.integers(1, 255))
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif len(data) > 1:
            del data[at]
    return bytes(data)


HOSTILE = st.one_of(
    st.binary(min_size=1, max_size=2048),
    mutated_hello(),
    st.integers(1, len(HELLO) - 1).map(lambda n: HELLO[:n]),
    st.binary(min_size=1, max_size=64).map(lambda tail: HELLO + tail),
    st.binary(min_size=1, max_size=64).map(lambda head: head + HELLO),
)


def _records_only(data: bytes) -> bool:
    """Whether data is a sequence of TLS records (the last may be cut short)."""
    at = 0
    while at < len(data):
        header = data[at : at + 5]
        if header[0] not in TLS_RECORD_TYPES or (len(header) > 1 and header[1] != 3):
            return False
        if len(header) < 5:
            return True
        at += 5 + int.from_bytes(header[3:5], "big")
    return True


def _feed(port: int, payload: bytes, one_at_a_time: bool) -> bytes:
    """Send payload (whole or a byte per send), half-close, return all that came back."""
    with socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT_S) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        got = bytearray()
        try:
            if one_at_a_time:
                for i in range(len(payload)):
                    sock.sendall(payload[i : i + 1])
            else:
                sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            while chunk := sock.recv(65536):
                got += chunk
        except ConnectionError:
            pass  # closed on us mid-send (RST): a refusal too
        except OSError as e:  # the RST came before our shutdown(): not connected any more
            if e.errno != errno.ENOTCONN:
                raise
        return bytes(got)


def _good_echo(port: int, certs: tls.Certs) -> bool:
    payload = os.urandom(64 * 1024)
    with tls.tls_connect(port, tls.client_context(certs=certs)) as sock:
        return tls.echo_python(sock, payload) == payload


def test_hostile_handshakes_never_crash_echo_or_grow_memory(tmp_path: Path) -> None:
    """Random, mutated, truncated and trickled handshakes and 200 stalled peers leave the
    daemon serving, echo nothing to any of them, and keep its RSS within 16 MiB of its
    warmed-up size."""
    certs = tls.make_certs(tmp_path / "certs")
    config = write_config(
        tmp_path / "epolld.yaml",
        {
            "listen": [{"address": "127.0.0.1:0", "tls": True}],
            "tls": {
                "certificate": str(certs.server.certificate),
                "key": str(certs.server.key),
                "handshake_timeout": "1s",
            },
            "logging": {"level": "info"},
        },
    )
    daemon = Daemon(config)
    try:
        port = daemon.port
        for _ in range(20):  # warm up: the allocator's arenas, the first handshakes
            assert _good_echo(port, certs)
            _feed(port, HELLO[:100], one_at_a_time=False)
        start_rss = daemon.rss_bytes()

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        )
        @given(payload=HOSTILE, one_at_a_time=st.booleans())
        def hostile_peer(payload: bytes, one_at_a_time: bool) -> None:
            got = _feed(port, payload, one_at_a_time)
            assert _records_only(got), f"not TLS records: {got[:40]!r}"
            if len(payload) >= 8:
                assert payload not in got, "the peer's bytes came back"

        hostile_peer()

        # Many peers stalled mid-handshake at once: held, then closed by the timeout.
        stalled = [socket.create_connection(("127.0.0.1", port)) for _ in range(STALLED_PEERS)]
        try:
            for i, sock in enumerate(stalled):
                sock.sendall(HELLO[: 1 + i % (len(HELLO) - 1)])
            time.sleep(0.3)
            held_rss = daemon.rss_bytes()
            for sock in stalled:
                sock.settimeout(READ_TIMEOUT_S)
                assert sock.recv(65536)[:1] in (b"", b"\x15"), "closed, at most with an alert"
        finally:
            for sock in stalled:
                sock.close()

        assert _good_echo(port, certs), "a good client is still served"
        end_rss = daemon.rss_bytes()
        assert held_rss < start_rss + MEMORY_BOUND_BYTES, (start_rss, held_rss)
        assert end_rss < start_rss + MEMORY_BOUND_BYTES, (start_rss, end_rss)
        assert daemon.proc.poll() is None
        crashes = [e for e in daemon.logs if e.get("event") in ("loop_crashed", "handler_bug")]
        assert not crashes, crashes[:3]
        assert not [e for e in daemon.logs if "exception" in e], daemon.tail(10)
        assert not daemon.bad_lines, daemon.bad_lines[:5]
    finally:
        daemon.stop()
