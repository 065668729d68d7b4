"""Scenario 5: slow and stuck peers at scale, beside well-behaved ones.

At once: SILENT clients that connect and send nothing, TRICKLING ones that send one byte a
second (and check its echo), and NEVER_READING ones that write until their socket blocks and
never read their echo, beside ping-pong probes in a process of their own. The daemon's limits
must bound what they cost: the silent and the stuck ones are closed by `idle_timeout`, the
trickling ones (active) are not, the daemon's memory stays within what `high_water` allows
for the stuck ones, its descriptors come back down, and the probes' p99 stays under 10 ms.

The trickling clients are a C program (trickle.c, built here): 5,000 sends and 5,000 echoes
a second in Python took a large share of the two cores the daemon and the probes need. A
stuck client is watched without reading it (TCP_INFO: the daemon's RST or FIN changes its
state), since reading its echo would be traffic that restarts its idle timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import selectors
import shutil
import socket
import struct
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
SETTLED_S = 5.0  # connected and stuck by then: a second p99 counts from here (a figure only)
WATCH_EVERY_S = 0.5  # how often the stuck clients' TCP state is read
TCP_ESTABLISHED = 1
# struct tcp_info (linux/tcp.h): tcpi_state, then at byte 52 tcpi_last_data_recv (ms).
_TCP_INFO = struct.Struct("<B51xI")
TRICKLE_SOURCE = Path(__file__).with_name("trickle.c")
# Kernel counters that show TCP short of memory (nstat names), reported beside the row.
MEMORY_COUNTERS = ("TCPMemoryPressures", "PruneCalled", "TCPRcvQDrop", "TCPAbortOnMemory")


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


def _build_trickler(directory: Path) -> Path:
    if shutil.which("gcc") is None:
        subprocess.run(
            [f"{REPO}/packaging/dev/apt-install", "gcc", "libc6-dev"], check=True, cwd=REPO
        )
    exe = directory / "trickle"
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(exe), str(TRICKLE_SOURCE)], check=True)
    return exe


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


def _tcp_mem_pressure_bytes() -> int:
    """net.ipv4.tcp_mem's middle value (pages): above it TCP is under memory pressure."""
    pages = int(Path("/proc/sys/net/ipv4/tcp_mem").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def tcp_counters() -> dict[str, int]:
    """The kernel's TCP counters (/proc/net/netstat, as nstat names them)."""
    values: dict[str, int] = {}
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, numbers in zip(lines[::2], lines[1::2], strict=True):
        values.update(zip(names.split()[1:], map(int, numbers.split()[1:]), strict=True))
    return values


def slow_peers(seconds: float, seed: int, trigger: str = "level") -> Row:
    row = Row(f"5. slow and stuck peers ({trigger})")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = SILENT + TRICKLING + NEVER_READING + 100
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, need)), hard))
    hold_s = max(seconds, IDLE_TIMEOUT_S + IDLE_TICK_S + SLACK_S + 5)
    errors: list[str] = []
    counters_before = tcp_counters()
    with tempfile.TemporaryDirectory() as tmp:
        trickle_exe = _build_trickler(Path(tmp))
        daemon = Daemon(_config(Path(tmp)), nofile=min(hard, 20000))
        socks: list[socket.socket] = []
        trickler: subprocess.Popen[str] | None = None
        try:
            port = daemon.port
            start_rss = daemon.rss_bytes()
            start_fds = daemon.fd_count()
            start_cpu = daemon.cpu_seconds()
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
                    f"--after={SETTLED_S:g}",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=REPO,
            )
            started = time.monotonic()
            until = started + hold_s
            silent = _connect_many(port, SILENT, errors)
            stuck = _connect_many(port, NEVER_READING, errors)
            for sock in stuck:  # until the echo, the buffers between and high_water are full
                with contextlib.suppress(BlockingIOError, OSError):
                    while sock.send(b"x" * (1 << 20)):
                        pass
            socks = silent + stuck
            trickle_from = time.monotonic() - started
            left_s = f"{until - time.monotonic():.1f}"
            trickler = subprocess.Popen(
                [str(trickle_exe), "127.0.0.1", str(port), str(TRICKLING), left_s],
                stdout=subprocess.PIPE,
                text=True,
            )
            stuck_watch = _StuckWatch(stuck, started)
            silent_closed = _watch_silent(silent, started, until, errors, stuck_watch)
            out, _ = trickler.communicate(timeout=60)
            trickle = json.loads(out.strip().splitlines()[-1])
            connected_s = trickle_from + trickle["connect_s"]
            stuck_watch.until_all_judged()
            result = probe_result(probe, 60)
            late_fds = _settled_fds(daemon, start_fds + PROBES + 10)
            peak_rss = sampler.stop()
            daemon_cpu = daemon.cpu_seconds() - start_cpu
        finally:
            if trickler is not None and trickler.poll() is None:
                trickler.kill()
                trickler.wait()
            for sock in socks:
                sock.close()
            daemon.stop()
    counters = {k: tcp_counters().get(k, 0) - counters_before.get(k, 0) for k in MEMORY_COUNTERS}
    growth = peak_rss - start_rss
    bound = NEVER_READING * (HIGH_WATER + READ_SIZE) + (SILENT + TRICKLING) * 4096 + (64 << 20)
    row.load = (
        f"{SILENT:,} silent, {TRICKLING:,} sending 1 B/s, {NEVER_READING:,} never reading,"
        f" {PROBES} ping-pong probes, {hold_s:g} s"
    )
    row.faults = "peers that stall, trickle and never read"
    row.bytes_verified = trickle["verified"] + result["bytes_verified"]
    row.connections_lost = trickle["lost"] + result["errors"]
    row.errors = len(errors) + trickle["errors"] + len(daemon.bad_lines)
    row.worst_latency_ms = result["max_ms"]
    row.failures.extend(errors[:10] + result["error_samples"])
    if trickle["errors"]:
        row.failures.append(f"the trickling clients: {trickle['first_error']}")
    row.notes.append(
        f"daemon RSS grew {growth / 2**20:.1f} MiB at its peak (bound {bound / 2**20:.0f} MiB);"
        f" descriptors {start_fds} at start, {late_fds} after the idle ones were closed;"
        f" probes p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms"
        f" ({result.get('p99_after_ms', 0.0):.2f} ms from {SETTLED_S:g} s on);"
        f" all connected within {connected_s:.1f} s"
    )
    row.notes.append(
        f"CPU: daemon {daemon_cpu:.1f} s, trickling clients {trickle['cpu_s']:.1f} s;"
        f" stuck clients closed {stuck_watch.first_close_s:.1f}-{stuck_watch.last_close_s:.1f} s"
        f" after the first connect, their last echo received at"
        f" {stuck_watch.last_traffic_s:.1f} s at the latest;"
        f" kernel TCP memory at most {sampler.peak_tcp_bytes / 2**30:.2f} GiB (tcp_mem's"
        f" pressure line {_tcp_mem_pressure_bytes() / 2**30:.2f} GiB),"
        f" {', '.join(f'{k} {v}' for k, v in counters.items())}"
    )
    slow = sorted(result.get("slow_by_second", {}).items(), key=lambda kv: -kv[1])[:8]
    row.notes.append(
        "probes' round trips of 10 ms or more, by second of the run (the worst 8): "
        + (", ".join(f"{s} s: {n}" for s, n in slow) or "none")
    )
    row.require(
        silent_closed == len(silent),
        f"{len(silent) - silent_closed} silent clients were not closed by idle_timeout",
    )
    row.require(
        not stuck_watch.open,
        f"{len(stuck_watch.open)} stuck clients were not closed by idle_timeout"
        f" ({stuck_watch.describe_open()})",
    )
    row.require(
        not stuck_watch.late,
        f"{len(stuck_watch.late)} stuck clients were closed later than idle_timeout allows after"
        f" their last traffic: {stuck_watch.late[:5]}",
    )
    row.require(
        connected_s < IDLE_TIMEOUT_S, f"connecting took {connected_s:.1f} s, past idle_timeout"
    )
    row.require(
        trickle["connected"] == TRICKLING,
        f"{TRICKLING - trickle['connected']} trickling clients could not connect",
    )
    row.require(trickle["lost"] == 0, f"{trickle['lost']} trickling clients were closed")
    row.require(
        growth <= bound, f"RSS grew {growth / 2**20:.1f} MiB, above {bound / 2**20:.0f} MiB"
    )
    row.require(late_fds <= start_fds + PROBES + 10, f"{late_fds} descriptors left open")
    row.require_timing(
        result["p99_ms"] < P99_MAX_MS, f"the probes' p99 was {result['p99_ms']:.2f} ms"
    )
    return row


class _StuckWatch:
    """When the daemon closed each never-reading client, read from its TCP state (not from
    the socket: reading the echo would be traffic, which restarts its idle timeout), and
    when it last received echo: the idle timeout counts from the last traffic.

    Args:
        socks: the stuck clients.
        started: the monotonic time the first client connected.
    """

    def __init__(self, socks: list[socket.socket], started: float) -> None:
        self.started = started
        self.open = {sock: started for sock in socks}  # -> when it last received data
        self.closed_at: list[float] = []
        self.late: list[str] = []
        self.last_traffic_s = 0.0
        self._looked = 0.0

    @property
    def first_close_s(self) -> float:
        return min(self.closed_at, default=0.0)

    @property
    def last_close_s(self) -> float:
        return max(self.closed_at, default=0.0)

    def watch(self, force: bool = False) -> None:
        """One look at every client still open (at most every WATCH_EVERY_S)."""
        now = time.monotonic()
        if now - self._looked < WATCH_EVERY_S and not force:
            return
        self._looked = now
        for sock, traffic_at in list(self.open.items()):
            raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO.size)
            state, since_data_ms = _TCP_INFO.unpack(raw)
            if state == TCP_ESTABLISHED:
                self.open[sock] = max(traffic_at, now - since_data_ms / 1000)
                continue
            del self.open[sock]
            closed_s = now - self.started
            self.closed_at.append(closed_s)
            traffic_s = traffic_at - self.started
            self.last_traffic_s = max(self.last_traffic_s, traffic_s)
            if closed_s > traffic_s + _allowed_s():
                self.late.append(f"closed at {closed_s:.1f} s, last echo at {traffic_s:.1f} s")

    def until_all_judged(self) -> None:
        """Watch until each is closed or past what idle_timeout allows after its traffic."""
        while self.open:
            self.watch()
            deadline = max(self.open.values(), default=0.0) + _allowed_s() + WATCH_EVERY_S
            if time.monotonic() > deadline:
                self.watch(force=True)
                return
            time.sleep(WATCH_EVERY_S)

    def describe_open(self) -> str:
        return ", ".join(
            f"last echo at {t - self.started:.1f} s" for t in list(self.open.values())[:5]
        )


def _settled_fds(daemon: Daemon, expected: int, wait_s: float = 10.0) -> int:
    """The daemon's descriptors once they are down to expected (the clients that left
    last are closed within a few turns), or after wait_s."""
    deadline = time.monotonic() + wait_s
    while (count := daemon.fd_count()) > expected and time.monotonic() < deadline:
        time.sleep(0.1)
    return count


def _allowed_s() -> float:
    """From a connection's last traffic to its close: the timeout, a tick, closing in
    batches, and one look of the watcher."""
    return IDLE_TIMEOUT_S + IDLE_TICK_S + SLACK_S + WATCH_EVERY_S


class _PeakRss(threading.Thread):
    """The daemon's largest RSS, and the kernel's largest TCP memory (all sockets, both
    ends: /proc/net/sockstat), sampled twice a second from start to stop()."""

    def __init__(self, daemon: Daemon) -> None:
        super().__init__(daemon=True)
        self._daemon = daemon
        self._done = threading.Event()
        self.peak = daemon.rss_bytes()
        self.peak_tcp_bytes = 0

    def run(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._done.wait(0.5):
            with contextlib.suppress(OSError, AssertionError):
                self.peak = max(self.peak, self._daemon.rss_bytes())
            with contextlib.suppress(OSError, ValueError):
                line = Path("/proc/net/sockstat").read_text().split("TCP:", 1)[1].splitlines()[0]
                pages = int(line.split(" mem ")[1].split()[0])
                self.peak_tcp_bytes = max(self.peak_tcp_bytes, pages * page)

    def stop(self) -> int:
        self._done.set()
        self.join()
        return self.peak


def _watch_silent(
    silent: list[socket.socket],
    started: float,
    until: float,
    errors: list[str],
    stuck: _StuckWatch,
) -> int:
    """Until `until`: how many silent clients saw their FIN within the idle timeout's
    bounds (counted from `started`, before the first of them connected); the stuck
    clients are looked at meanwhile."""
    sel = selectors.DefaultSelector()
    for sock in silent:
        sel.register(sock, selectors.EVENT_READ)
    closed = 0
    while time.monotonic() < until:
        stuck.watch()
        for key, _ in sel.select(min(WATCH_EVERY_S, max(0.0, until - time.monotonic()))):
            client = key.fileobj
            assert isinstance(client, socket.socket)
            try:
                data = client.recv(4096)
            except OSError:
                data = b""
            waited = time.monotonic() - started
            if data:
                errors.append(f"a silent client received {data!r}")
            elif waited <= IDLE_TIMEOUT_S + IDLE_TICK_S + SLACK_S + 5:
                closed += 1
            else:
                errors.append(f"a silent client was closed after {waited:.1f} s")
            sel.unregister(client)
    sel.close()
    return closed
