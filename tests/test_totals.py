"""Totals never go back (issue 19, bug 3): across a restart handoff, with and without
workers, and across a worker's replacement, every *_total series /metrics serves (and the
duration histogram) is at least what an earlier scrape saw.

The daemon runs as a real subprocess; /metrics is read with prometheus_client's parser.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

import epolld
from tests.epolld_process import WAIT_S, Daemon, write_config
from tests.test_metrics_endpoint import metrics_port, scrape
from tests.test_workers import start_workers as start_workers
from tests.traffic import connect, recv_until_eof, roundtrip

pytestmark = pytest.mark.slow

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
PROXY_LISTEN = {"address": "127.0.0.1:0", "proxy_protocol": True}
METRICS = {"listen": "127.0.0.1:0"}
HEADER_ERRORS = "epolld_proxy_header_errors_total"
SCRAPE_LOOP_S = 10.0  # the tight scrape loop runs at most this long in all
# The code before the one list of totals: its handoff records must restore in this one.
OLD_RELEASE = "72c99cf"
OLD_VERSION = f"{epolld.__version__}+{OLD_RELEASE}"


def monotonic_keys(samples: Samples) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    """The series that may never go down: every *_total, the histogram's parts."""
    return {
        key
        for key in samples
        if key[0].endswith("_total") or key[0].startswith("epolld_connection_duration_seconds_")
    }


def lower(before: Samples, after: Samples) -> dict[str, tuple[float, float | None]]:
    """The monotonic series of before that after shows lower (or not at all)."""
    return {
        f"{name}{dict(labels)}": (value, after.get((name, labels)))
        for name, labels in monotonic_keys(before)
        if (value := before[(name, labels)]) > after.get((name, labels), -1.0)
    }


def header_errors(samples: Samples) -> float:
    return sum(v for (name, _), v in samples.items() if name == HEADER_ERRORS)


def scrape_until(port: int, done: Any) -> Samples:
    """Scrape until done(samples): the workers report once a heartbeat."""
    deadline = time.monotonic() + WAIT_S
    while not done(samples := scrape(port)):
        assert time.monotonic() < deadline, samples
        time.sleep(0.05)
    return samples


def send_bad_headers(port: int, count: int) -> None:
    """count connections whose first line is no PROXY header: each is refused."""
    for _ in range(count):
        with connect(port) as sock:
            sock.sendall(b"NOT A PROXY HEADER\r\n")
            with contextlib.suppress(ConnectionResetError):  # closed unread: RST or FIN
                assert sock.recv(100) == b""


def send_proxied(port: int, payload: bytes) -> None:
    """One proxied client that echoes payload and closes."""
    with connect(port) as sock:
        sock.sendall(b"PROXY TCP4 192.0.2.1 192.0.2.2 4000 7080\r\n")
        roundtrip(sock, payload)


def test_single_process_handoff_keeps_every_total(tmp_path: Path) -> None:
    """A re-exec restart handoff keeps PROXY header errors and every other total: no
    monotonic series is lower after it than before."""
    config = {
        "listen": [PROXY_LISTEN, "udp:127.0.0.1:0"],
        "metrics": METRICS,
        "logging": {"level": "info"},
    }
    daemon = Daemon(write_config(tmp_path / "epolld.yaml", config))
    try:
        addresses = [e["address"] for e in daemon.wait_for("listening", count=2)]
        port = int(next(a for a in addresses if a[:4] != "udp:").rsplit(":", 1)[1])
        udp_port = int(next(a for a in addresses if a[:4] == "udp:").rsplit(":", 1)[1])
        mport = metrics_port(daemon)
        send_bad_headers(port, 5)
        for _ in range(3):
            send_proxied(port, b"0123456789")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.settimeout(WAIT_S)
            udp.sendto(b"datagram", ("127.0.0.1", udp_port))
            assert udp.recv(100) == b"datagram"
        before = scrape_until(
            mport,
            lambda s: s[("epolld_connections_closed_total", (("reason", "eof"),))] == 3,
        )
        assert header_errors(before) == 5
        daemon.signal(signal.SIGUSR2)
        daemon.wait_for("handoff_complete")
        after = scrape(mport)
        assert header_errors(after) == 5
        assert lower(before, after) == {}
        logged = len(daemon.events("stats"))
        daemon.signal(signal.SIGUSR1)  # the stats line's totals carried on too
        stats = daemon.wait_for("stats", count=logged + 1)[-1]
        assert sum(stats["proxy_header_errors"].values()) == 5
        assert (stats["proxy_headers_read"], stats["accepted"], stats["udp_echoed"]) == (3, 3, 1)
    finally:
        daemon.stop()
    assert not daemon.bad_lines, daemon.bad_lines[:5]


def test_replaced_worker_keeps_its_header_errors_in_the_sum(start_workers: Any) -> None:
    """workers: 2: a SIGKILLed worker's PROXY header errors (and every other total) stay
    in the supervisor's sums once its replacement serves."""
    w = start_workers(2, {"listen": [PROXY_LISTEN], "metrics": METRICS})
    port, mport = w.daemon.port, metrics_port(w.daemon)
    send_bad_headers(port, 40)  # spread over both workers by SO_REUSEPORT
    refused = w.daemon.wait_for("connection_closed", count=40, reason="proxy_header")
    victim = refused[0]["worker"]
    before = scrape_until(mport, lambda s: header_errors(s) == 40)
    old_pid = w.pids()[victim]
    w.daemon.wait_for("worker_started", count=2)
    os.kill(old_pid, signal.SIGKILL)
    w.daemon.wait_for("worker_ready", count=3)
    assert w.pids()[victim] != old_pid
    deadline = time.monotonic() + 2.0  # past the replacement's first heartbeats
    while time.monotonic() < deadline:
        after = scrape(mport)
        assert lower(before, after) == {}
        assert header_errors(after) == 40
        before = after
        time.sleep(0.05)


def _try_scrape(port: int) -> Samples | None:
    """A scrape, or None when the handoff closed it (a scrape in progress is left behind)."""
    try:
        return scrape(port)
    except (OSError, http.client.HTTPException):
        return None


def test_workers_handoff_never_serves_lower_totals(start_workers: Any) -> None:
    """workers: 2, SIGUSR2: scraped in a tight loop from before the signal until after
    handoff_complete and the new workers' first reports, no total is ever lower than in
    an earlier scrape (no partial sums while the new workers have not reported)."""
    w = start_workers(2, {"metrics": METRICS})
    port, mport = w.daemon.port, metrics_port(w.daemon)
    socks = [connect(port) for _ in range(20)]
    try:
        for sock in socks:
            roundtrip(sock, b"0123456789")
        for sock in socks[10:]:  # closed ones: durations and reasons count too
            sock.shutdown(socket.SHUT_WR)
            assert recv_until_eof(sock) == b""
        scrape_until(
            mport, lambda s: s[("epolld_connections_closed_total", (("reason", "eof"),))] == 10
        )
        seen: list[Samples] = []
        signalled_at = complete_at = None
        signalled_scrapes = 0
        deadline = time.monotonic() + SCRAPE_LOOP_S
        while time.monotonic() < deadline:
            samples = _try_scrape(mport)
            if samples is not None:
                if seen:
                    assert lower(seen[-1], samples) == {}, f"scrape {len(seen)}"
                seen.append(samples)
            now = time.monotonic()
            if signalled_at is None and len(seen) >= 5:
                w.daemon.signal(signal.SIGUSR2)
                signalled_at, signalled_scrapes = now, len(seen)
            if complete_at is None and w.supervisor_events("handoff_complete"):
                complete_at = now
            if complete_at is not None and now - complete_at > 2.0:  # > one heartbeat
                break
        assert complete_at is not None, "no handoff_complete"
        assert len(seen) > signalled_scrapes + 5  # the loop did scrape the new supervisor
        assert seen[-1][("epolld_connections_accepted_total", ())] == 20
    finally:
        for sock in socks:
            sock.close()


def _old_release(tmp_path: Path) -> Path:
    """A directory to put on PYTHONPATH whose epolld is OLD_RELEASE's (from this
    repository's history), its version marked so that the logs tell the two apart."""
    root = Path(epolld.__file__).resolve().parent.parent
    old = tmp_path / "old"
    old.mkdir()
    tar = tmp_path / "old.tar"
    git = ["git", "-C", str(root), "archive", f"--output={tar}", OLD_RELEASE, "epolld"]
    subprocess.run(git, check=True, timeout=WAIT_S)
    subprocess.run(["tar", "-xf", str(tar), "-C", str(old)], check=True, timeout=WAIT_S)
    init = old / "epolld" / "__init__.py"
    version = f'__version__ = "{epolld.__version__}"'
    assert version in init.read_text()
    init.write_text(init.read_text().replace(version, f'__version__ = "{OLD_VERSION}"'))
    return old


@pytest.mark.parametrize("workers", [1, 2])
def test_upgrade_from_the_old_records_keeps_every_total(tmp_path: Path, workers: int) -> None:
    """A re-exec restart from OLD_RELEASE's code to this one (PYTHONPATH's link flipped
    between the two) keeps every total the old code handed over, UDP's included, with
    and without workers."""
    current = tmp_path / "current"
    current.symlink_to(_old_release(tmp_path))
    config = {
        "listen": ["127.0.0.1:0", "udp:127.0.0.1:0"],
        "workers": workers,
        "metrics": METRICS,
        "logging": {"level": "info"},
    }
    daemon = Daemon(
        write_config(tmp_path / "epolld.yaml", config),
        env={**os.environ, "PYTHONPATH": str(current)},
        prefix=("env", "-C", str(tmp_path)),  # not the checkout: python -m looks there first
    )
    socks: list[socket.socket] = []
    try:  # each worker logs both addresses
        addresses = [e["address"] for e in daemon.wait_for("listening", count=2 * workers)]
        port = int(next(a for a in addresses if a[:4] != "udp:").rsplit(":", 1)[1])
        udp_port = int(next(a for a in addresses if a[:4] == "udp:").rsplit(":", 1)[1])
        mport = metrics_port(daemon)
        socks = [connect(port) for _ in range(6)]
        for sock in socks:
            roundtrip(sock, b"0123456789")
        for sock in socks[3:]:  # closed: reasons and durations
            sock.shutdown(socket.SHUT_WR)
            assert recv_until_eof(sock) == b""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.settimeout(WAIT_S)
            for _ in range(4):
                udp.sendto(b"datagram", ("127.0.0.1", udp_port))
                assert udp.recv(100) == b"datagram"
        before = scrape_until(
            mport,
            lambda s: (
                s[("epolld_connections_closed_total", (("reason", "eof"),))] == 3
                and s.get(("epolld_udp_datagrams_sent_total", ())) == 4
            ),
        )
        assert before[("epolld_build_info", (("version", OLD_VERSION),))] == 1
        flipped = tmp_path / "current.new"
        flipped.symlink_to(Path(epolld.__file__).resolve().parent.parent)
        os.replace(flipped, current)
        daemon.signal(signal.SIGUSR2)
        daemon.wait_for("handoff_complete", old_version=OLD_VERSION, worker=None)
        after = scrape_until(  # with workers: once they have reported what they took over
            mport, lambda s: s[("epolld_connections_accepted_total", ())] == 6
        )
        assert after[("epolld_build_info", (("version", epolld.__version__),))] == 1
        assert lower(before, after) == {}
        assert after[("epolld_udp_datagrams_sent_total", ())] == 4
    finally:
        for sock in socks:
            sock.close()
        daemon.stop()
        for started in daemon.events("worker_started"):  # in process groups of their own
            with contextlib.suppress(ProcessLookupError):
                os.kill(started["pid"], signal.SIGKILL)
    assert not daemon.bad_lines, daemon.bad_lines[:5]
