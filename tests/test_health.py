"""/healthz and /readyz on the metrics endpoint of the real daemon (issue 23).

The daemon runs as a subprocess with metrics.listen on 127.0.0.1 port 0; probes are real
HTTP requests. A stop's drain keeps the endpoint open so that /readyz says 503 while an
open connection drains; with workers, /healthz follows the workers' heartbeats.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from epolld.observability import health
from tests.conftest import StartDaemon
from tests.epolld_process import WAIT_S, Daemon, write_config
from tests.traffic import connect, recv_until_eof, roundtrip

pytestmark = pytest.mark.slow

METRICS = {"metrics": {"listen": "127.0.0.1:0"}}


@pytest.fixture
def mode() -> dict[str, Any]:
    """Health does not depend on the echo's trigger or I/O mode: one mode."""
    return {}


def metrics_port(daemon: Daemon) -> int:
    address = daemon.wait_for("metrics_listening")[-1]["address"]
    return int(address.rsplit(":", 1)[1])


def probe(port: int, path: str, method: str = "GET") -> tuple[int, str]:
    """One request on a new connection: the status and the body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT_S)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def wait_status(port: int, path: str, status: int, timeout: float = WAIT_S) -> str:
    """Probe until path answers status; its body."""
    deadline = time.monotonic() + timeout
    last: tuple[int, str] = (0, "")
    while time.monotonic() < deadline:
        last = probe(port, path)
        if last[0] == status:
            return last[1]
        time.sleep(0.05)
    raise AssertionError(f"{path} never answered {status}; last {last}")


def test_readiness_states() -> None:
    """Not ready while starting, ready once started, draining when stopping or drained."""
    readiness = health.Readiness()
    assert readiness.problem() == "starting"
    readiness.started = True
    assert readiness.problem() is None
    assert not readiness.draining
    readiness.operator_drain = True
    assert readiness.draining
    assert "operator" in (readiness.problem() or "")
    readiness.operator_drain = False
    readiness.stopping = True
    assert readiness.problem() == "draining: stopping"
    assert readiness.draining


def test_health_replies() -> None:
    """A check's None is 200 "ok", its reason is a 503 with that reason; other paths: None."""
    ok = health.reply("/healthz", lambda: None, lambda: "starting")
    assert ok is not None
    assert (ok.status, ok.body) == (200, b"ok\n")
    not_ready = health.reply("/readyz", lambda: None, lambda: "starting")
    assert not_ready is not None
    assert (not_ready.status, not_ready.body) == (503, b"starting\n")
    assert ("Cache-Control", "no-store") in not_ready.headers
    assert health.reply("/metrics", lambda: None, lambda: None) is None


def test_healthz_and_readyz_while_serving(start_daemon: StartDaemon) -> None:
    """A serving daemon answers 200 on both; HEAD too; a POST gets 405."""
    daemon = start_daemon(METRICS)
    port = metrics_port(daemon)
    daemon.wait_for("metrics_listening")
    assert probe(port, "/healthz") == (200, "ok\n")
    assert probe(port, "/readyz") == (200, "ok\n")
    assert probe(port, "/readyz", "HEAD") == (200, "")
    assert probe(port, "/healthz", "POST")[0] == 405


def test_sigterm_drain_answers_503_on_readyz_until_the_last_connection_closes(
    start_daemon: StartDaemon,
) -> None:
    """From SIGTERM, /readyz is 503 and /healthz 200 while an open client drains (it gets
    its FIN, the daemon waits for the client's), and the daemon exits 0 once it closes."""
    daemon = start_daemon({**METRICS, "shutdown_timeout": "30s"})
    port = metrics_port(daemon)
    assert probe(port, "/readyz")[0] == 200
    sock = connect(daemon.port)
    try:
        roundtrip(sock, b"before")
        daemon.signal(signal.SIGTERM)
        daemon.wait_for("shutdown_started")
        assert probe(port, "/readyz") == (503, "draining: stopping\n")
        assert probe(port, "/healthz") == (200, "ok\n")
        assert recv_until_eof(sock) == b""  # the drain's FIN; the daemon waits for ours
        assert probe(port, "/readyz")[0] == 503
        assert daemon.proc.poll() is None
    finally:
        sock.close()
    assert daemon.wait() == 0
    with pytest.raises(ConnectionRefusedError):
        probe(port, "/readyz")


# --- with workers ---------------------------------------------------------------------


@pytest.fixture
def supervisors(tmp_path: Path) -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        pids = {e["pid"] for e in daemon.events("worker_started")}
        daemon.stop()
        for pid in pids:  # in process groups of their own
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def start_supervisor(
    tmp_path: Path, started: list[Daemon], workers: int = 2, **settings: Any
) -> Daemon:
    config = {
        "listen": ["127.0.0.1:0"],
        "workers": workers,
        "stats_interval": "0s",
        **METRICS,
        **settings,
    }
    daemon = Daemon(write_config(tmp_path / "epolld.yaml", config))
    started.append(daemon)
    daemon.wait_for("workers_ready")
    return daemon


def test_workers_sigterm_drain_answers_503_on_readyz(
    tmp_path: Path, supervisors: list[Daemon]
) -> None:
    """With workers the supervisor answers: 200 once every worker is ready, 503 on
    /readyz from SIGTERM while a worker's client drains, /healthz 200 throughout."""
    daemon = start_supervisor(tmp_path, supervisors, shutdown_timeout="30s")
    port = metrics_port(daemon)
    assert probe(port, "/readyz") == (200, "ok\n")
    assert probe(port, "/healthz") == (200, "ok\n")
    echo_port = int(daemon.wait_for("listening")[0]["address"].rsplit(":", 1)[1])
    sock = connect(echo_port)
    try:
        roundtrip(sock, b"before")
        daemon.signal(signal.SIGTERM)
        daemon.wait_for("shutdown_started", worker=None)
        assert probe(port, "/readyz") == (503, "draining: stopping\n")
        assert probe(port, "/healthz") == (200, "ok\n")
        assert recv_until_eof(sock) == b""
        assert probe(port, "/readyz")[0] == 503
        assert daemon.proc.poll() is None
    finally:
        sock.close()
    assert daemon.wait() == 0


def test_workers_stuck_worker_fails_healthz_until_it_is_replaced(
    tmp_path: Path, supervisors: list[Daemon]
) -> None:
    """A worker whose loop stops (SIGSTOP) fails /healthz once its heartbeat is older than
    its timeout, and /readyz until its replacement is ready; then both are 200 again."""
    daemon = start_supervisor(tmp_path, supervisors)
    port = metrics_port(daemon)
    worker = daemon.wait_for("worker_started", worker=1)[0]["pid"]
    timeout_s = daemon.wait_for("supervisor_started")[0]["worker_timeout_s"]
    os.kill(worker, signal.SIGSTOP)
    # One keep-alive connection, probed every few milliseconds: the 503 lasts from the
    # heartbeat's deadline to the supervisor's next check (up to a heartbeat) and the kill.
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT_S)
    seen: dict[int, str] = {}
    deadline = time.monotonic() + timeout_s + WAIT_S
    try:
        while time.monotonic() < deadline and not daemon.events("worker_unresponsive"):
            conn.request("GET", "/healthz")
            response = conn.getresponse()
            seen.setdefault(response.status, response.read().decode())
            time.sleep(0.002)
    finally:
        conn.close()
    assert seen.get(200) == "ok\n"
    assert seen.get(503, "").startswith("worker 1 silent for "), seen
    daemon.wait_for("worker_ready", count=3)  # the replacement
    assert probe(port, "/healthz") == (200, "ok\n")
    assert probe(port, "/readyz") == (200, "ok\n")


def test_workers_killed_worker_fails_readyz_until_its_replacement_is_ready(
    tmp_path: Path, supervisors: list[Daemon]
) -> None:
    """A worker killed twice in a row waits out its back-off (0.5 s): meanwhile /readyz
    says 503 naming it, and /healthz stays 200 (the supervisor is handling it); both are
    200 once the replacement is ready."""
    daemon = start_supervisor(tmp_path, supervisors)
    port = metrics_port(daemon)
    for count in (1, 2):
        pid = daemon.wait_for("worker_started", count=count, worker=1)[-1]["pid"]
        os.kill(pid, signal.SIGKILL)
        daemon.wait_for("worker_exited", count=count, worker=1)
    respawn = daemon.wait_for("worker_respawning", count=2, worker=1)[-1]
    assert respawn["delay_s"] == 0.5
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT_S)
    try:
        conn.request("GET", "/readyz")
        response = conn.getresponse()
        body = response.read().decode()
        conn.request("GET", "/healthz")
        health_response = conn.getresponse()
        assert (health_response.status, health_response.read()) == (200, b"ok\n")
    finally:
        conn.close()
    assert response.status == 503
    assert body in ("worker 1 waiting\n", "worker 1 starting\n")
    started = daemon.wait_for("worker_started", count=3, worker=1)[-1]["pid"]
    daemon.wait_for("worker_ready", worker=1, pid=started)
    assert probe(port, "/readyz") == (200, "ok\n")
