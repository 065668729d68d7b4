"""epolld-client against epolld's own discard, chargen and info listeners (TCP, UDP, TLS)
and against a listener with `faults:` (issue 22); and the services and a fault listener
in classic daemon mode (`epolld --daemon`, python-daemon).

Both ends are the real programs: `python -m epolld` as a subprocess, `python -m
epolld.client` as another (tests/test_client_measures.py's run_json).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from epolld.services import pattern
from tests import tls_support as tls
from tests.epolld_process import Daemon, write_config
from tests.test_client_measures import at, run_json, tls_args
from tests.test_daemon_mode import Daemons, _is_gone, _logged, _wait_for
from tests.test_daemon_mode import daemons as daemons  # the fixture
from tests.traffic import connect, recv_exactly, recv_until_eof

pytestmark = pytest.mark.slow

# name -> (host, listen entry beyond its address); one loopback address per TCP listener
LISTENERS: dict[str, tuple[str, dict[str, Any]]] = {
    "discard": ("127.0.0.41", {"service": "discard"}),
    "udp discard": ("udp:127.0.0.41", {"service": "discard"}),
    "chargen": ("127.0.0.42", {"service": "chargen"}),
    "info": ("127.0.0.43", {"service": "info"}),
    "udp info": ("udp:127.0.0.43", {"service": "info"}),
    "tls discard": ("127.0.0.44", {"service": "discard", "tls": True}),
    "tls chargen": ("127.0.0.45", {"service": "chargen", "tls": True}),
    "tls info": ("127.0.0.46", {"service": "info", "tls": True}),
    "delay": ("127.0.0.47", {"faults": {"delay": "100ms"}}),
}


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tls.Certs:
    return tls.make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, certs: tls.Certs
) -> Iterator[tuple[Daemon, dict[str, int]]]:
    """The daemon and each listener's port by name."""
    listen = [{"address": f"{host}:0", **entry} for host, entry in LISTENERS.values()]
    config = {
        "listen": listen,
        "tls": {"certificate": str(certs.server.certificate), "key": str(certs.server.key)},
        "udp": {"rate": 0, "total_rate": 0, "byte_rate": 0},
        "logging": {"level": "info", "connections": True},
        "stats_interval": "0s",
    }
    daemon = Daemon(write_config(tmp_path_factory.mktemp("daemon") / "epolld.yaml", config))
    try:
        listening = [e["address"] for e in daemon.wait_for("listening", count=len(listen))]
        ports = {}
        for name, (host, _) in LISTENERS.items():
            (address,) = [a for a in listening if a.rsplit(":", 1)[0] == host]
            ports[name] = int(address.rsplit(":", 1)[1])
        yield daemon, ports
    finally:
        daemon.stop()
    assert not daemon.bad_lines


def where(served: tuple[Daemon, dict[str, int]], name: str) -> list[str]:
    host = LISTENERS[name][0].removeprefix("udp:")
    return at(served[1][name], host)


def test_client_discard_against_epolld_over_tcp_udp_and_tls(
    served: tuple[Daemon, dict[str, int]], certs: tls.Certs
) -> None:
    """--service discard measures one-way throughput to epolld's discard over TCP and TLS
    (epolld read every byte sent) and sends datagrams to its UDP discard."""
    daemon = served[0]
    code, doc = run_json("--service=discard", *where(served, "discard"), "--count=20",
                         "--size=64KiB")  # fmt: skip
    assert code == 0, doc
    assert doc["bytes_sent"] == 20 * 65536
    daemon.wait_for("connection_closed", bytes_in=20 * 65536, bytes_out=0)
    code, doc = run_json("--service=discard", "--udp", *where(served, "udp discard"),
                         "--count=20", "--size=100", "--rate=1000")  # fmt: skip
    assert (code, doc["datagrams_sent"]) == (0, 20), doc
    secure = tls_args(certs, "--sni=localhost")
    code, doc = run_json("--service=discard", *where(served, "tls discard"), *secure,
                         "--count=10", "--size=10000")  # fmt: skip
    assert (code, doc["transport"], doc["bytes_sent"]) == (0, "tls", 100_000), doc
    daemon.wait_for("connection_closed", bytes_in=100_000, bytes_out=0)


def test_client_verifies_epolld_chargen_over_tcp_and_tls(
    served: tuple[Daemon, dict[str, int]], certs: tls.Certs
) -> None:
    """--service chargen checks epolld's RFC 864 pattern byte for byte, plain and over TLS."""
    for name, more in (("chargen", []), ("tls chargen", tls_args(certs, "--sni=localhost"))):
        code, doc = run_json("--service=chargen", *where(served, name), *more, "--count=10",
                             "--size=20000")  # fmt: skip
        assert code == 0, doc
        assert doc["bytes_received"] == 200_000


def test_client_prints_what_epolld_info_saw_over_tcp_udp_and_tls(
    served: tuple[Daemon, dict[str, int]], certs: tls.Certs
) -> None:
    """--service info carries epolld's fields: the listener, the transport, the daemon's
    PID; over TLS the session's version and SNI."""
    pid = served[0].proc.pid
    code, doc = run_json("--service=info", *where(served, "info"))
    assert code == 0, doc
    assert doc["info"]["listener"] == f"127.0.0.43:{served[1]['info']}"
    assert (doc["info"]["transport"], doc["info"]["pid"]) == ("tcp", pid)
    code, doc = run_json("--service=info", "--udp", *where(served, "udp info"))
    assert code == 0, doc
    assert (doc["info"]["transport"], doc["info"]["pid"]) == ("udp", pid)
    code, doc = run_json("--service=info", *where(served, "tls info"),
                         *tls_args(certs, "--sni=localhost"))  # fmt: skip
    assert code == 0, doc
    assert doc["info"]["tls"]["sni"] == "localhost"
    assert doc["info"]["tls"]["version"] in ("TLSv1.2", "TLSv1.3")


def test_client_json_p50_against_an_epolld_delay_listener(
    served: tuple[Daemon, dict[str, int]],
) -> None:
    """Against epolld with `faults: {delay: 100ms}` the client's p50 is at least 100 ms."""
    code, doc = run_json("--check", *where(served, "delay"), "--count=5", "--size=100")
    assert code == 0, doc
    assert doc["latency_ms"]["p50"] >= 100
    assert doc["latency_ms"]["min"] >= 100


# Classic daemon mode


def test_services_and_faults_in_daemon_mode(daemons: Daemons, tmp_path: Path) -> None:
    """`epolld --daemon` serves discard, chargen and info, and a listener with faults
    (a 100 ms delay, then a FIN after 5 bytes), from the detached process."""
    log = tmp_path / "epolld.log"
    hosts = {"discard": "127.0.0.51", "chargen": "127.0.0.52", "info": "127.0.0.53"}
    settings = {
        "listen": [
            *({"address": f"{host}:0", "service": name} for name, host in hosts.items()),
            {"address": "127.0.0.54:0", "faults": {"delay": "100ms", "close_after_bytes": 5}},
        ],
        "logging": {"format": "json"},
        "daemon": {"pidfile": str(tmp_path / "epolld.pid"), "log_file": str(log)},
    }
    result = daemons.start_epolld(settings)
    assert result.returncode == 0, result.stderr
    pid = daemons.pids[0]
    ports = {
        entry["address"].rsplit(":", 1)[0]: int(entry["address"].rsplit(":", 1)[1])
        for entry in _logged(log, "listening", count=4)
    }
    with connect(ports[hosts["discard"]], hosts["discard"]) as sock:
        sock.sendall(b"d" * 100_000)
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == b""
    with connect(ports[hosts["chargen"]], hosts["chargen"]) as sock:
        assert recv_exactly(sock, 10_000) == pattern.expected(0, 10_000)
    with connect(ports[hosts["info"]], hosts["info"]) as sock:
        assert json.loads(recv_until_eof(sock))["pid"] == pid
    started = time.monotonic()
    with connect(ports["127.0.0.54"], "127.0.0.54") as sock:
        sock.sendall(b"hello world")
        assert recv_until_eof(sock) == b"hello"
    assert time.monotonic() - started >= 0.1
    os.kill(pid, signal.SIGTERM)
    _wait_for("the daemon to exit", lambda: _is_gone(pid))
