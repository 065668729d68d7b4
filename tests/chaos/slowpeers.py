"""Scenario 5: slow and stuck peers at scale, beside well-behaved ones.

At once: SILENT clients that connect and send nothing, TRICKLING ones that send one byte a
second (and check its echo), and NEVER_READING ones that write until their socket blocks and
never read their echo, beside ping-pong probes in a process of their own. The daemon's limits
must bound what they cost: the silent and the stuck ones are closed by `idle_timeout`, the
trickling ones (active) are not, the daemon's memory stays within what `high_water` allows
for the stuck ones, its descriptors come back down, and the probes' p99 stays under 10 ms.
"""

from __future__ import annotations

import contextlib
import resource
import selectors
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tests.chaos.netns import REPO
from tests.chaos.outcome import Row, probe_result
from tests.epolld_process import Daemon, write_config

SILENT = 5000
TRICKLING = 5000
NEVER_READING = 1000
PROBES = 10
IDLE_TIMEOUT_S = 45.0  # longer than connecting all of them takes, even on a busy machine
IDLE_TICK_S = 1.0
SLACK_S = 5.0  # closing 6,000 connections at once takes the daemon a few turns of 500
HIGH_WATER = 64 * 1024
READ_SIZE = 64 * 1024
P99_MAX_MS = 10.0
CONNECT_TIMEOUT_S = 10.0


def _config(directory: Path) -> Path:
    return write_config(
        directory / "epolld.yaml",
        {
            "listen": ["127.0.0.1:0"],
            "backlog": 4096,
            "buffers": {"read_size": "64KiB", "high_water": "64KiB", "low_water": "16KiB"},
            "limits": {"max_connections": 15000, "idle_timeout": f"{IDLE_TIMEOUT_S:g}s"},
            "logging": {"level": "info", "connections": False},
        },
    )


def _connect_many(port: int, count: int, errors: list[str]) -> list[socket.socket]:
    socks: list[socket.socket] = []
    for _ in range(count):
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=CONNECT_TIMEOUT_S)
        except OSError as e:
            errors.append(f"connect failed: {e!r}")
            continue
        sock.setblocking(False)
        socks.append(sock)
    return socks


def slow_peers(seconds: float, seed: int, trigger: str = "level") -> Row:
    row = Row(f"5. slow and stuck peers ({trigger})")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = SILENT + TRICKLING + NEVER_READING + 100
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, need)), hard))
    hold_s = max(seconds, IDLE_TIMEOUT_S + IDLE_TICK_S + SLACK_S + 5)
    errors: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        daemon = Daemon(_config(Path(tmp)), nofile=min(hard, 20000))
        socks: list[socket.socket] = []
        try:
            port = daemon.port
            start_rss = daemon.rss_bytes()
            start_fds = daemon.fd_count()
            sampler = _PeakRss(daemon)
            sampler.start()
            probe = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.chaos.probe",
                    "127.0.0.1",
                    str(port),
                    f"--conns={PROBES}",
                    f"--seconds={hold_s}",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=REPO,
            )
            started = time.monotonic()
            silent = _connect_many(port, SILENT, errors)
            stuck = _connect_many(port, NEVER_READING, errors)
            for sock in stuck:  # until the echo, the buffers between and high_water are full
                with contextlib.suppress(BlockingIOError, OSError):
                    while sock.send(b"x" * (1 << 20)):
                        pass
            trickling = _connect_many(port, TRICKLING, errors)
            socks = silent + stuck + trickling
            connected_s = time.monotonic() - started
            verified, silent_closed, trickle_lost = _hold(
                silent, trickling, started, started + hold_s, errors
            )
            result = probe_result(probe, 60)
            stuck_closed = sum(1 for sock in stuck if _closed(sock))
            late_fds = daemon.fd_count()
            peak_rss = sampler.stop()
        finally:
            for sock in socks:
                sock.close()
            daemon.stop()
    growth = peak_rss - start_rss
    bound = NEVER_READING * (HIGH_WATER + READ_SIZE) + (SILENT + TRICKLING) * 4096 + (64 << 20)
    row.load = (
        f"{SILENT:,} silent, {TRICKLING:,} sending 1 B/s, {NEVER_READING:,} never reading,"
        f" {PROBES} ping-pong probes, {hold_s:g} s"
    )
    row.faults = "peers that stall, trickle and never read"
    row.bytes_verified = verified + result["bytes_verified"]
    row.connections_lost = trickle_lost + result["errors"]
    row.errors = len(errors) + len(daemon.bad_lines)
    row.worst_latency_ms = result["max_ms"]
    row.failures.extend(errors[:10] + result["error_samples"])
    row.notes.append(
        f"daemon RSS grew {growth / 2**20:.1f} MiB at its peak (bound {bound / 2**20:.0f} MiB);"
        f" descriptors {start_fds} at start, {late_fds} after the idle ones were closed;"
        f" probes p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms;"
        f" all connected within {connected_s:.1f} s"
    )
    row.require(
        silent_closed == len(silent),
        f"{len(silent) - silent_closed} silent clients were not closed by idle_timeout",
    )
    row.require(
        stuck_closed == len(stuck),
        f"{len(stuck) - stuck_closed} stuck clients were not closed by idle_timeout",
    )
    row.require(
        connected_s < IDLE_TIMEOUT_S, f"connecting took {connected_s:.1f} s, past idle_timeout"
    )
    row.require(trickle_lost == 0, f"{trickle_lost} trickling clients were closed")
    row.require(
        growth <= bound, f"RSS grew {growth / 2**20:.1f} MiB, above {bound / 2**20:.0f} MiB"
    )
    row.require(
        late_fds <= start_fds + TRICKLING + PROBES + 10, f"{late_fds} descriptors left open"
    )
    row.require_timing(
        result["p99_ms"] < P99_MAX_MS, f"the probes' p99 was {result['p99_ms']:.2f} ms"
    )
    return row


def _closed(sock: socket.socket) -> bool:
    """Whether the daemon has ended this connection: its echo read away (what the kernel
    still sends after the daemon's close included), then EOF or a reset within 5 s."""
    sock.settimeout(5.0)
    try:
        while sock.recv(1 << 20):
            pass
    except TimeoutError:
        return False
    except OSError:  # a reset: closed with unsent echo
        return True
    return True


class _PeakRss(threading.Thread):
    """The daemon's largest RSS, sampled twice a second from start to stop()."""

    def __init__(self, daemon: Daemon) -> None:
        super().__init__(daemon=True)
        self._daemon = daemon
        self._done = threading.Event()
        self.peak = daemon.rss_bytes()

    def run(self) -> None:
        while not self._done.wait(0.5):
            with contextlib.suppress(OSError, AssertionError):
                self.peak = max(self.peak, self._daemon.rss_bytes())

    def stop(self) -> int:
        self._done.set()
        self.join()
        return self.peak


def _hold(
    silent: list[socket.socket],
    trickling: list[socket.socket],
    started: float,
    until: float,
    errors: list[str],
) -> tuple[int, int, int]:
    """Trickles a byte a second on each trickling client until `until`, checking every echo.

    Returns the bytes verified, how many silent clients saw their FIN within the idle
    timeout's bounds (counted from `started`, before the first of them connected), and how
    many trickling clients were lost."""
    sel = selectors.DefaultSelector()
    for sock in silent:
        sel.register(sock, selectors.EVENT_READ, "silent")
    for sock in trickling:
        sel.register(sock, selectors.EVENT_READ, "trickling")
    owed = {sock: 0 for sock in trickling}
    silent_closed = trickle_lost = verified = 0
    per_turn = max(1, len(trickling) // 100)  # every client once a second, in 100 turns
    turn = 0
    while time.monotonic() < until:
        batch = trickling[(turn * per_turn) % max(1, len(trickling)) :][:per_turn]
        turn += 1
        for sock in batch:
            if sock in owed:
                with contextlib.suppress(BlockingIOError):
                    owed[sock] += sock.send(b"t")
        for key, _ in sel.select(0.01):
            sock = key.fileobj
            try:
                data = sock.recv(4096)  # type: ignore[union-attr]
            except OSError as e:
                data = b""
                if key.data == "trickling":
                    errors.append(f"a trickling client: {e!r}")
            if key.data == "silent":
                waited = time.monotonic() - started
                if data:
                    errors.append(f"a silent client received {data!r}")
                elif waited <= IDLE_TIMEOUT_S + IDLE_TICK_S + SLACK_S + 5:
                    silent_closed += 1
                else:
                    errors.append(f"a silent client was closed after {waited:.1f} s")
                sel.unregister(sock)
            elif not data:
                trickle_lost += 1
                owed.pop(sock, None)  # type: ignore[call-overload]
                sel.unregister(sock)
            elif data != b"t" * len(data) or len(data) > owed[sock]:  # type: ignore[index]
                errors.append(f"a trickling client got {data!r}, owed {owed[sock]}")  # type: ignore[index]
            else:
                owed[sock] -= len(data)  # type: ignore[index]
                verified += len(data)
    sel.close()
    return verified, silent_closed, trickle_lost
