"""The metrics endpoint of the real daemon, over real sockets: formats, limits, reload.

The daemon runs as a subprocess with metrics.listen on 127.0.0.1 port 0; the port comes
from its metrics_listening log line. The scrapes here are read with prometheus_client's
own parsers, the format Prometheus reads.
"""

from __future__ import annotations

import contextlib
import http.client
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_text

from tests.conftest import StartDaemon
from tests.epolld_process import Daemon
from tests.traffic import connect, recv_until_eof, roundtrip

pytestmark = pytest.mark.slow

WAIT_S = 15.0  # longer than the endpoint's 5 s request deadline
METRICS = {"metrics": {"listen": "127.0.0.1:0"}}


@pytest.fixture
def mode() -> dict[str, Any]:
    """The metrics endpoint does not depend on the echo's trigger or I/O mode: one mode."""
    return {}


def metrics_port(daemon: Daemon, count: int = 1) -> int:
    address = daemon.wait_for("metrics_listening", count=count)[-1]["address"]
    return int(address.rsplit(":", 1)[1])


def get(
    port: int, path: str = "/metrics", method: str = "GET", host: str = "127.0.0.1", **headers: str
) -> tuple[http.client.HTTPResponse, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=WAIT_S)
    try:
        conn.request(method, path, headers=headers)
        response = conn.getresponse()
        return response, response.read()
    finally:
        conn.close()


def scrape(
    port: int, host: str = "127.0.0.1"
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics as text 0.0.4: sample name and sorted labels -> value."""
    response, body = get(port, host=host)
    assert response.status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in parse_text(body.decode())
        for s in family.samples
    }


def rewrite(daemon: Daemon, **changes: object) -> None:
    settings = yaml.safe_load(daemon.config_path.read_text())
    settings.update(changes)
    daemon.config_path.write_text(yaml.safe_dump(settings))


def reload(daemon: Daemon, event: str = "config_reloaded") -> None:
    before = len(daemon.events(event))
    daemon.signal(signal.SIGHUP)
    daemon.wait_for(event, count=before + 1)


@contextlib.contextmanager
def raw(port: int, host: str = "127.0.0.1") -> Iterator[socket.socket]:
    with socket.create_connection((host, port), timeout=WAIT_S) as sock:
        yield sock


def wait_for_sample(port: int, key: tuple[str, tuple[tuple[str, str], ...]], value: float) -> None:
    """Scrape until a sample has the value: the daemon sees a client's close asynchronously."""
    deadline = time.monotonic() + WAIT_S
    while (seen := scrape(port).get(key)) != value:
        assert time.monotonic() < deadline, f"{key} = {seen}, expected {value}"
        time.sleep(0.05)


# --- formats and routes ---------------------------------------------------------------


def test_text_format_counts_open_clients_and_bytes(start_daemon: StartDaemon) -> None:
    """GET /metrics is text 0.0.4 whose connection and byte counts match the clients'."""
    daemon = start_daemon(METRICS)
    port = metrics_port(daemon)
    with connect(daemon.port) as a, connect(daemon.port) as b, connect(daemon.port) as c:
        roundtrip(a, b"x" * 1000)
        roundtrip(b, b"y" * 24)
        roundtrip(c, b"z")
        response, _ = get(port)
        assert response.status == 200
        assert response.getheader("Content-Type") == "text/plain; version=0.0.4; charset=utf-8"
        samples = scrape(port)
    assert samples[("epolld_connections", ())] == 3
    assert samples[("epolld_connections_accepted_total", ())] == 3
    assert samples[("epolld_received_bytes_total", ())] == 1025
    assert samples[("epolld_sent_bytes_total", ())] == 1025
    assert samples[("epolld_listeners", ())] == 1
    assert samples[("process_open_fds", ())] > 0
    assert samples[("process_resident_memory_bytes", ())] > 0


def test_openmetrics_when_accept_asks(start_daemon: StartDaemon) -> None:
    """Prometheus' Accept header gets OpenMetrics that the OpenMetrics parser reads."""
    daemon = start_daemon(METRICS)
    accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
    response, body = get(metrics_port(daemon), Accept=accept)
    assert response.status == 200
    assert (response.getheader("Content-Type") or "").startswith("application/openmetrics-text")
    names = {f.name for f in parse_openmetrics(body.decode())}
    assert {"epolld_connections", "epolld_connection_duration_seconds"} <= names


def test_index_page_and_head(start_daemon: StartDaemon) -> None:
    """GET / links to /metrics; HEAD of both answers 200 with a length and no body."""
    daemon = start_daemon(METRICS)
    port = metrics_port(daemon)
    response, body = get(port, "/")
    assert response.status == 200
    assert b'<a href="/metrics">' in body
    for path in ("/", "/metrics"):
        response, body = get(port, path, method="HEAD")
        assert response.status == 200
        assert int(response.getheader("Content-Length") or 0) > 0
        assert body == b""


def test_404_and_405(start_daemon: StartDaemon) -> None:
    """Unknown paths get 404; other methods get 405 with Allow: GET, HEAD."""
    daemon = start_daemon(METRICS)
    port = metrics_port(daemon)
    response, _ = get(port, "/metrics/extra")
    assert response.status == 404
    response, _ = get(port, "/metrics", method="DELETE")
    assert response.status == 405
    assert response.getheader("Allow") == "GET, HEAD"


def test_keep_alive_serves_several_requests(start_daemon: StartDaemon) -> None:
    """One connection carries several scrapes, as Prometheus keeps its connections."""
    daemon = start_daemon(METRICS)
    conn = http.client.HTTPConnection("127.0.0.1", metrics_port(daemon), timeout=WAIT_S)
    try:
        for _ in range(3):
            conn.request("GET", "/metrics")
            response = conn.getresponse()
            assert response.status == 200
            assert b"epolld_connections" in response.read()
    finally:
        conn.close()


# --- limits ---------------------------------------------------------------------------


def test_oversized_head_gets_431_and_close(start_daemon: StartDaemon) -> None:
    """A request head over 8 KiB is answered 431 and the connection closed."""
    daemon = start_daemon(METRICS)
    with raw(metrics_port(daemon)) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 9000)
        answer = recv_until_eof(sock, WAIT_S)
    assert answer.startswith(b"HTTP/1.1 431 ")
    assert answer.count(b"HTTP/1.1") == 1


def test_slow_client_is_closed_at_its_deadline(start_daemon: StartDaemon) -> None:
    """A client that never completes its request head is closed (within the 5 s deadline)."""
    daemon = start_daemon(METRICS)
    port = metrics_port(daemon)
    with raw(port) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # no blank line: never complete
        assert recv_until_eof(sock, WAIT_S) == b""
    daemon.wait_for("metrics_client_timeout")
    assert scrape(port)[("epolld_connections", ())] == 0  # the endpoint still serves


def test_idle_keep_alive_is_closed_too(start_daemon: StartDaemon) -> None:
    """After an answer, a connection that sends nothing more is closed at the next deadline."""
    daemon = start_daemon(METRICS)
    with raw(metrics_port(daemon)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = recv_until_eof(sock, WAIT_S)
    assert answer.startswith(b"HTTP/1.1 200 OK")


def test_seventeenth_client_is_closed_and_sixteen_are_served(start_daemon: StartDaemon) -> None:
    """With 16 metrics clients open a 17th is closed at once; the 16 are then all served."""
    daemon = start_daemon(METRICS)
    port = metrics_port(daemon)
    with contextlib.ExitStack() as stack:
        clients = [stack.enter_context(raw(port)) for _ in range(16)]
        with raw(port) as extra, contextlib.suppress(ConnectionResetError):
            assert extra.recv(1) == b""  # closed at once (or reset)
        daemon.wait_for("metrics_client_refused")
        for sock in clients:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        for sock in clients:
            assert recv_until_eof(sock, WAIT_S).startswith(b"HTTP/1.1 200 OK")
    # All 16 closed: a new client is served again.
    response, _ = get(port)
    assert response.status == 200


# --- counters the service keeps for the endpoint ----------------------------------------


def test_refused_and_closed_counters_and_durations(start_daemon: StartDaemon) -> None:
    """Refusals count by limit; closes count by reason and each adds one duration."""
    daemon = start_daemon({**METRICS, "limits": {"max_connections": 1}})
    port = metrics_port(daemon)
    with connect(daemon.port) as first:
        roundtrip(first, b"held")
        with connect(daemon.port) as second:
            assert recv_until_eof(second) == b""
        first.shutdown(socket.SHUT_WR)
        assert recv_until_eof(first) == b""
    refused = ("epolld_connections_refused_total", (("limit", "max_connections"),))
    wait_for_sample(port, ("epolld_connections_closed_total", (("reason", "eof"),)), 1)
    samples = scrape(port)
    assert samples[refused] == 1
    assert samples[("epolld_connections_accepted_total", ())] == 1
    assert samples[("epolld_connection_duration_seconds_count", ())] == 1
    assert samples[("epolld_connection_duration_seconds_bucket", (("le", "+Inf"),))] == 1
    assert samples[("epolld_connections", ())] == 0


def test_reload_results_are_counted(start_daemon: StartDaemon) -> None:
    """A good reload counts as success, a bad one as failure and clears last-successful."""
    daemon = start_daemon(METRICS)
    port = metrics_port(daemon)
    samples = scrape(port)
    assert samples[("epolld_config_last_reload_successful", ())] == 1
    rewrite(daemon, limits={"max_connections": 50})
    reload(daemon)
    good = daemon.config_path.read_text()
    daemon.config_path.write_text(good + "backlog: lots\n")
    reload(daemon, "config_reload_failed")
    samples = scrape(port)
    assert samples[("epolld_config_reloads_total", (("result", "success"),))] == 1
    assert samples[("epolld_config_reloads_total", (("result", "failure"),))] == 1
    assert samples[("epolld_config_last_reload_successful", ())] == 0
    daemon.config_path.write_text(good)
    reload(daemon)
    assert scrape(port)[("epolld_config_last_reload_successful", ())] == 1


# --- reload of the endpoint itself -------------------------------------------------------


def test_reload_adds_moves_and_removes_the_endpoint(start_daemon: StartDaemon) -> None:
    """A reload turns the endpoint on, moves it to another address, and turns it off."""
    daemon = start_daemon()
    rewrite(daemon, **METRICS)
    reload(daemon)
    first = metrics_port(daemon)
    assert get(first)[0].status == 200
    rewrite(daemon, metrics={"listen": "127.0.0.2:0"})
    reload(daemon)
    second = metrics_port(daemon, count=2)
    assert get(second, host="127.0.0.2")[0].status == 200
    with pytest.raises(ConnectionRefusedError):
        get(first)
    rewrite(daemon, metrics={"listen": None})
    reload(daemon)
    daemon.wait_for("metrics_closed", count=2)
    with pytest.raises(ConnectionRefusedError):
        get(second, host="127.0.0.2")
    with connect(daemon.port) as sock:  # the echo never noticed
        roundtrip(sock, b"still echoing")


def test_reload_keeps_the_endpoint_socket_and_its_clients(start_daemon: StartDaemon) -> None:
    """An unchanged metrics address keeps its socket: an open scrape connection goes on."""
    daemon = start_daemon(METRICS)
    port = metrics_port(daemon)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT_S)
    try:
        conn.request("GET", "/metrics")
        conn.getresponse().read()
        rewrite(daemon, limits={"max_connections": 99})
        reload(daemon)
        conn.request("GET", "/metrics")  # the same TCP connection, across the reload
        response = conn.getresponse()
        assert response.status == 200
        response.read()
    finally:
        conn.close()
    assert len(daemon.events("metrics_listening")) == 1
    assert not daemon.events("metrics_closed")


def test_reload_to_an_unbindable_metrics_address_changes_nothing(
    start_daemon: StartDaemon,
) -> None:
    """A metrics address that cannot be bound fails the reload; the old endpoint stays."""
    daemon = start_daemon(METRICS)
    port = metrics_port(daemon)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        rewrite(daemon, metrics={"listen": f"127.0.0.1:{busy}"}, listen=["127.0.0.3:0"])
        daemon.signal(signal.SIGHUP)
        [failed] = daemon.wait_for("config_reload_failed")
    assert "metrics.listen" in failed["error"]
    assert get(port)[0].status == 200
    assert len(daemon.events("listening")) == 1  # 127.0.0.3 was not bound either
    assert scrape(port)[("epolld_config_last_reload_successful", ())] == 0


def test_endpoint_closes_on_sigterm(start_daemon: StartDaemon) -> None:
    """SIGTERM closes the metrics endpoint with the echo listeners; the daemon exits 0."""
    daemon = start_daemon(METRICS)
    port = metrics_port(daemon)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
    with pytest.raises(ConnectionRefusedError):
        get(port)


def test_unix_socket_endpoint(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """metrics.listen can be a Unix socket path: HTTP over it works the same."""
    path = tmp_path / "metrics.sock"
    daemon = start_daemon({"metrics": {"listen": f"unix:{path}"}})
    daemon.wait_for("metrics_listening")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(WAIT_S)
        sock.connect(str(path))
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = recv_until_eof(sock, WAIT_S)
    assert answer.startswith(b"HTTP/1.1 200 OK")
    assert b"epolld_connections 0.0" in answer


def test_metrics_off_does_not_load_prometheus_client(start_daemon: StartDaemon) -> None:
    """Without metrics.listen the daemon never loads prometheus_client (about 12 MiB)."""
    daemon = start_daemon()
    # prometheus_client's exposition imports ssl, whose C extension shows in the maps.
    assert "_ssl" not in Path(f"/proc/{daemon.pid}/maps").read_text()
    metrics_on = start_daemon(METRICS)
    metrics_on.wait_for("metrics_listening")
    assert "_ssl" in Path(f"/proc/{metrics_on.pid}/maps").read_text()
