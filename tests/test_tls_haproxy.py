"""A real HAProxy (Debian 12's 2.6) in front of a TLS epolld (issue 21): `server ... ssl
verify required ca-file ... send-proxy-v2` to a `proxy_protocol: true` + `tls: true`
listener, and a TLS tcp-check that sends a line and expects its echo.

The client speaks plain TCP to HAProxy from 127.0.0.2; HAProxy verifies epolld's
certificate against the test CA and sends the PROXY v2 header, then its ClientHello.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests import tls_support as tls
from tests.epolld_process import WAIT_S, Daemon, write_config
from tests.haproxy import PROXY_SOURCE, Backend, HAProxy, missing_reason
from tests.traffic import connect, pump

pytestmark = pytest.mark.slow

CLIENT = "127.0.0.2"


def test_haproxy_verifies_epolld_and_its_clients_are_named_with_tls_details(
    tmp_path: Path,
) -> None:
    """HAProxy's TLS tcp-check marks the TLS epolld UP; clients through HAProxy get their
    bytes back exactly, and epolld's tls_established lines name each client's own address
    (from the PROXY header) with the TLS version and cipher."""
    reason = missing_reason()
    if reason:
        pytest.skip(f"HAProxy test {reason}")
    certs = tls.make_certs(tmp_path / "certs")
    config = write_config(
        tmp_path / "epolld.yaml",
        {
            "listen": [{"address": "127.0.0.1:0", "proxy_protocol": True, "tls": True}],
            "tls": {"certificate": str(certs.server.certificate), "key": str(certs.server.key)},
            "proxy": {"trusted": [f"{PROXY_SOURCE}/32"]},
            "logging": {"level": "info", "connections": True},
        },
    )
    daemon = Daemon(config)
    haproxy: HAProxy | None = None
    try:
        backend = Backend("e0", daemon.port, "send-proxy-v2", ssl_ca=str(certs.ca.certificate))
        haproxy = HAProxy(tmp_path, [backend])
        haproxy.wait_status({"e0": "UP"})
        # The check connections: a PROXY LOCAL header, then TLS, then the echoed line.
        daemon.wait_for("tls_established")
        socks = [connect(haproxy.port, source=CLIENT) for _ in range(4)]
        payloads = [os.urandom(256 << 10) for _ in socks]
        try:
            assert pump(list(zip(socks, payloads, strict=True))) == payloads
            clients = {f"{CLIENT}:{sock.getsockname()[1]}" for sock in socks}
        finally:
            for sock in socks:
                sock.close()

        deadline = time.monotonic() + WAIT_S  # the last log lines may still be on their way
        while True:
            named = [e for e in daemon.events("tls_established") if e["peer"] in clients]
            if {e["peer"] for e in named} == clients or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert {e["peer"] for e in named} == clients, daemon.tail(40)
        for entry in named:
            assert entry["version"] in ("TLSv1.2", "TLSv1.3")
            assert entry["cipher"]
        health = [e for e in daemon.events("tls_established") if e not in named]
        assert all(str(e["peer"]).startswith(PROXY_SOURCE + ":") for e in health), health[:3]
        assert not daemon.events("tls_handshake_failed")
        assert not daemon.events("proxy_header_refused")
        assert haproxy.server_status() == {"e0": "UP"}
    finally:
        if haproxy is not None:
            haproxy.stop()
        print(daemon.tail(40))
        daemon.stop()
        assert not daemon.bad_lines, daemon.bad_lines[:5]
