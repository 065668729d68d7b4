"""The PROXY protocol against the real daemon, in all four modes: headers, peers, refusals."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
from typing import Any

import pytest
import yaml

from tests.conftest import StartDaemon
from tests.epolld_process import Daemon
from tests.test_metrics_endpoint import metrics_port, scrape
from tests.test_proxy_parser import inet4, inet6, tlv, v2
from tests.traffic import connect, recv_exactly, recv_until_eof, roundtrip

pytestmark = pytest.mark.slow

PLAIN_HOST = "127.0.0.2"  # the plain listener's address (two port 0s on one would collide)
V1 = b"PROXY TCP4 192.0.2.10 198.51.100.1 40001 7080\r\n"
V2 = v2(addresses=inet4("192.0.2.20", "198.51.100.1", 40002, 7080), tlvs=tlv(0x05, b"id-1"))


def proxied(settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """A daemon with one PROXY listener and one plain one, logging every connection."""
    config: dict[str, Any] = {
        "listen": [{"address": "127.0.0.1:0", "proxy_protocol": True}, f"{PLAIN_HOST}:0"],
        "logging": {"level": "debug", "connections": True},
    }
    config.update(settings or {})
    return config


def ports(daemon: Daemon) -> tuple[int, int]:
    """(the PROXY listener's port on 127.0.0.1, the plain one's on PLAIN_HOST)."""
    first, second = (e["address"] for e in daemon.wait_for("listening", count=2)[:2])
    return int(first.rsplit(":", 1)[1]), int(second.rsplit(":", 1)[1])


def assert_closed_unechoed(sock: socket.socket) -> None:
    """The daemon closes the connection (FIN or RST) without sending a byte back."""
    with contextlib.suppress(ConnectionResetError):
        assert recv_until_eof(sock, timeout=10) == b""


def stats(daemon: Daemon) -> dict[str, Any]:
    before = len(daemon.events("stats"))
    daemon.signal(signal.SIGUSR1)
    return daemon.wait_for("stats", count=before + 1)[-1]


def opened(daemon: Daemon, **fields: Any) -> dict[str, Any]:
    return daemon.wait_for("connection_opened", **fields)[-1]


@pytest.mark.parametrize(
    ("header", "peer"),
    [
        pytest.param(V1, "192.0.2.10:40001", id="v1"),
        pytest.param(V2, "192.0.2.20:40002", id="v2"),
        pytest.param(
            v2(family=0x21, addresses=inet6("2001:db8::7", "2001:db8::1", 5, 7080)),
            "[2001:db8::7]:5",
            id="v2-tcp6",
        ),
    ],
)
def test_header_then_echo(start_daemon: StartDaemon, header: bytes, peer: str) -> None:
    """The header is never echoed, the bytes in its segment are, and the peer is the client."""
    daemon = start_daemon(proxied())
    proxy_port, _ = ports(daemon)
    with connect(proxy_port) as sock:
        sock.sendall(header + b"first bytes, same segment\n")
        assert recv_exactly(sock, 26) == b"first bytes, same segment\n"
        roundtrip(sock, b"and more later\n")
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == b""
    entry = opened(daemon, peer=peer)
    assert entry["proxy"].startswith("127.0.0.1:")
    closed = daemon.wait_for("connection_closed", peer=peer)[-1]
    assert closed["bytes_in"] == closed["bytes_out"] == 41


def test_header_one_byte_at_a_time(start_daemon: StartDaemon) -> None:
    """A header that arrives one byte per segment is read whole, and then echo starts."""
    daemon = start_daemon(proxied())
    proxy_port, _ = ports(daemon)
    for header in (V1, V2):
        with connect(proxy_port) as sock:
            for i in range(len(header)):
                sock.sendall(header[i : i + 1])
            roundtrip(sock, b"after a slow header")
    opened(daemon, peer="192.0.2.10:40001")
    opened(daemon, peer="192.0.2.20:40002")


def test_large_payload_after_header(start_daemon: StartDaemon) -> None:
    """8 MiB sent in one go right behind the header come back exactly (backpressure too)."""
    daemon = start_daemon(proxied())
    proxy_port, _ = ports(daemon)
    payload = os.urandom(8 << 20)
    with connect(proxy_port) as sock:
        sock.sendall(V2 + payload[:1000])
        sock.sendall(payload[1000:])
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock, timeout=60) == payload


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(v2(command=0, family=0), id="v2-local"),
        pytest.param(b"PROXY UNKNOWN\r\n", id="v1-unknown"),
        pytest.param(v2(family=0x12, addresses=inet4("192.0.2.1", "192.0.2.2", 1, 2)), id="v2-udp"),
    ],
)
def test_local_and_unknown_are_the_proxy_itself(start_daemon: StartDaemon, header: bytes) -> None:
    """Health-check forms (LOCAL, UNKNOWN) and unusable families are served as the proxy."""
    daemon = start_daemon(proxied())
    proxy_port, _ = ports(daemon)
    with connect(proxy_port, source="127.0.0.5") as sock:
        sock.sendall(header + b"health-check\r\n")
        assert recv_exactly(sock, 14) == b"health-check\r\n"
    entry = daemon.wait_for("connection_opened")[-1]
    assert entry["peer"].startswith("127.0.0.5:")
    assert entry["peer"] == entry["proxy"]


REFUSED = [
    pytest.param(b"GET / HTTP/1.0\r\n\r\n", "not_proxy_protocol", id="not-proxy"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\nhello", "v1_malformed", id="v1-port"),
    pytest.param(b"PROXY " + b"x" * 120, "v1_too_long", id="v1-long"),
    pytest.param(v2(version=1), "v2_bad_version", id="v2-version"),
    pytest.param(v2(command=5), "v2_bad_command", id="v2-command"),
    pytest.param(v2(family=0x51, addresses=bytes(12)), "v2_bad_family", id="v2-family"),
    pytest.param(v2(family=0x21, addresses=bytes(12)), "v2_short_address", id="v2-short"),
    pytest.param(
        v2(addresses=inet4("1.2.3.4", "5.6.7.8", 1, 2), tlvs=b"\x01\x00\x40ab"),
        "v2_bad_tlv",
        id="v2-tlv",
    ),
]


@pytest.mark.parametrize(("data", "reason"), REFUSED)
def test_bad_header_is_closed_logged_and_counted(
    start_daemon: StartDaemon, data: bytes, reason: str
) -> None:
    """A bad header closes the connection unechoed, with a warning and a count by reason."""
    daemon = start_daemon(proxied())
    proxy_port, plain_port = ports(daemon)
    with connect(proxy_port) as sock:
        sock.sendall(data)
        assert_closed_unechoed(sock)
    warning = daemon.wait_for("proxy_header_refused", reason=reason)[-1]
    assert warning["proxy"].startswith("127.0.0.1:")
    assert stats(daemon)["proxy_header_errors"][reason] == 1
    with connect(
        plain_port, host=PLAIN_HOST
    ) as sock:  # the plain listener echoes the same bytes as data
        roundtrip(sock, data)


def test_refusals_are_logged_at_a_bounded_rate(start_daemon: StartDaemon) -> None:
    """Twenty bad headers give one warning and a count of twenty."""
    daemon = start_daemon(proxied())
    proxy_port, _ = ports(daemon)
    for _ in range(20):
        with connect(proxy_port) as sock:
            sock.sendall(b"nonsense\r\n")
            assert_closed_unechoed(sock)
    assert stats(daemon)["proxy_header_errors"]["not_proxy_protocol"] == 20
    assert len(daemon.events("proxy_header_refused")) == 1


def test_untrusted_source_is_refused(start_daemon: StartDaemon) -> None:
    """A peer outside proxy.trusted is closed unread, however good its header."""
    daemon = start_daemon(proxied({"proxy": {"trusted": ["127.0.0.2/32"]}}))
    proxy_port, plain_port = ports(daemon)
    with connect(proxy_port, source="127.0.0.3") as sock:
        sock.sendall(V1 + b"hello")
        assert_closed_unechoed(sock)
    daemon.wait_for("proxy_header_refused", reason="untrusted_source")
    with connect(proxy_port, source="127.0.0.2") as sock:
        sock.sendall(V1)
        roundtrip(sock, b"trusted")
    with connect(plain_port, host=PLAIN_HOST, source="127.0.0.3") as sock:
        roundtrip(sock, b"direct clients are not asked for a header")
    assert stats(daemon)["proxy_header_errors"]["untrusted_source"] == 1


@pytest.mark.parametrize("sent", [b"", b"PROXY TCP4 1.2.3.4", V2[:20]], ids=["none", "v1", "v2"])
def test_no_complete_header_within_the_timeout(start_daemon: StartDaemon, sent: bytes) -> None:
    """A connection still without a whole header after proxy.timeout is closed and counted."""
    daemon = start_daemon(proxied({"proxy": {"timeout": "300ms"}}))
    proxy_port, _ = ports(daemon)
    with connect(proxy_port) as sock:
        sock.sendall(sent)
        assert_closed_unechoed(sock)
    daemon.wait_for("proxy_header_refused", reason="timeout")
    assert stats(daemon)["proxy_header_errors"]["timeout"] == 1


def test_closed_before_the_header(start_daemon: StartDaemon) -> None:
    """A peer that hangs up mid-header is counted, and the daemon serves on."""
    daemon = start_daemon(proxied())
    proxy_port, _ = ports(daemon)
    with connect(proxy_port) as sock:
        sock.sendall(V1[:10])
    daemon.wait_for("proxy_header_refused", reason="closed_before_header")
    with connect(proxy_port) as sock:
        sock.sendall(V1)
        roundtrip(sock, b"still serving")


def test_per_ip_limit_applies_to_the_header_source(start_daemon: StartDaemon) -> None:
    """max_connections_per_ip counts the clients the headers name, not the proxy."""
    daemon = start_daemon(proxied({"limits": {"max_connections_per_ip": 1}}))
    proxy_port, _ = ports(daemon)
    first = b"PROXY TCP4 192.0.2.1 198.51.100.1 1000 7080\r\n"
    second = b"PROXY TCP4 192.0.2.1 198.51.100.1 1001 7080\r\n"
    other = b"PROXY TCP4 192.0.2.2 198.51.100.1 1002 7080\r\n"
    with connect(proxy_port) as a, connect(proxy_port) as b, connect(proxy_port) as c:
        a.sendall(first)
        roundtrip(a, b"one from 192.0.2.1")
        b.sendall(second + b"over the limit")
        assert_closed_unechoed(b)
        c.sendall(other)
        roundtrip(c, b"another client, the same proxy")
        roundtrip(a, b"the first is untouched")
    refused = daemon.wait_for("connection_refused", limit="max_connections_per_ip")[-1]
    assert refused["peer_ip"] == "192.0.2.1"


def test_connections_reading_a_header_count_against_max_connections(
    start_daemon: StartDaemon,
) -> None:
    """Silent connections waiting for their header fill max_connections like any other."""
    daemon = start_daemon(proxied({"limits": {"max_connections": 2}}))
    proxy_port, plain_port = ports(daemon)
    with connect(proxy_port) as a, connect(proxy_port) as b:
        a.sendall(b"PROX")  # half a header each: nothing to echo yet
        b.sendall(b"\r\n")
        with connect(
            plain_port, host=PLAIN_HOST
        ) as c:  # accepted after a and b: the listener's queue is FIFO
            assert_closed_unechoed(c)
        daemon.wait_for("connection_refused", limit="max_connections")
        a.sendall(V1[4:])
        roundtrip(a, b"a has its header now")


def test_reload_turns_the_protocol_on_and_changes_trust(start_daemon: StartDaemon) -> None:
    """On SIGHUP a listener gains proxy_protocol in place, and new trust and timeout apply."""
    daemon = start_daemon({"logging": {"level": "debug", "connections": True}})
    port = daemon.port
    with connect(port) as before:
        roundtrip(before, b"plain before")
        settings = yaml.safe_load(daemon.config_path.read_text())
        # The same entry as before (port 0 included), now with the flag: the socket stays.
        settings["listen"] = [{"address": "127.0.0.1:0", "proxy_protocol": True}]
        settings["proxy"] = {"trusted": ["127.0.0.2/32"], "timeout": "200ms"}
        daemon.config_path.write_text(yaml.safe_dump(settings))
        daemon.signal(signal.SIGHUP)
        changed = daemon.wait_for("config_reloaded")[-1]["changes"]
        assert {"listen", "proxy.trusted", "proxy.timeout"} <= set(changed)
        roundtrip(before, b"an open connection keeps echoing")
    with connect(port, source="127.0.0.2") as sock:
        sock.sendall(V1)
        roundtrip(sock, b"now with a header")
    with connect(port, source="127.0.0.1") as sock:
        sock.sendall(V1 + b"hello")
        assert_closed_unechoed(sock)
    with connect(port, source="127.0.0.2") as sock:
        assert_closed_unechoed(sock)  # the new 200 ms timeout
    daemon.wait_for("proxy_header_refused", reason="timeout")
    assert len(daemon.events("listening")) == 1  # the socket was kept, not re-bound


def test_unix_socket_listener_with_proxy_protocol(start_daemon: StartDaemon, tmp_path: Any) -> None:
    """A unix socket may take PROXY headers too; its clients need no trusted address."""
    path = str(tmp_path / "echo.sock")
    daemon = start_daemon(
        {
            "listen": [{"path": path, "proxy_protocol": True}],
            "logging": {"level": "debug", "connections": True},
        }
    )
    daemon.wait_for("listening")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(V2 + b"over unix")
        assert recv_exactly(sock, 9) == b"over unix"
    opened(daemon, peer="192.0.2.20:40002")


def test_socket_activation_takes_headers_on_a_proxy_address(tmp_path: Any) -> None:
    """A socket passed by systemd whose address is a proxy_protocol entry of listen takes
    PROXY headers; the daemon runs as a real process with the socket at fd 3."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    config = tmp_path / "epolld.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "listen": [{"address": f"127.0.0.1:{port}", "proxy_protocol": True}],
                "logging": {"level": "debug", "connections": True},
            }
        )
    )
    high = fcntl.fcntl(listener.fileno(), fcntl.F_DUPFD_CLOEXEC, 10)
    launcher = 'export LISTEN_PID=$$ LISTEN_FDS=1; exec "$0" -m epolld --config "$1" 3<&{fd}'
    try:
        proc = subprocess.Popen(
            ["bash", "-c", launcher.format(fd=high), sys.executable, str(config)],
            pass_fds=[high],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
    finally:
        os.close(high)
        listener.close()  # the daemon holds it now
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            entry = json.loads(line)
            if entry["event"] == "listening":
                assert entry["inherited"] is True
                break
        with connect(port) as sock:
            sock.sendall(V1 + b"activated")
            assert recv_exactly(sock, 9) == b"activated"
        for line in proc.stdout:
            entry = json.loads(line)
            if entry["event"] == "connection_opened":
                assert entry["peer"] == "192.0.2.10:40001"
                break
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
        proc.stdout.close()


def test_metrics_export_header_errors_by_reason(start_daemon: StartDaemon) -> None:
    """The metrics endpoint exports epolld_proxy_header_errors_total per reason, every
    reason present (0 until it happens)."""
    daemon = start_daemon(proxied({"metrics": {"listen": "127.0.0.1:0"}}))
    proxy_port, _ = ports(daemon)
    for _ in range(2):
        with connect(proxy_port) as sock:
            sock.sendall(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n")
            assert_closed_unechoed(sock)
    with connect(proxy_port) as sock:
        sock.sendall(V1)
        roundtrip(sock, b"a good one")
    daemon.wait_for("connection_closed", count=2, reason="proxy_header")
    samples = scrape(metrics_port(daemon))
    errors = {
        dict(labels)["reason"]: value
        for (name, labels), value in samples.items()
        if name == "epolld_proxy_header_errors_total"
    }
    assert errors["v1_malformed"] == 2
    assert errors["untrusted_source"] == errors["timeout"] == 0
    assert len(errors) == 11
