"""Scenario 4: a bad network, and a SYN flood.

`bad_network`: the daemon in a namespace of its own, its clients in another behind a link
with loss, delay, reordering and duplication (tests/chaos/relay.py). The soak's client mix
and a ping-pong probe run over it; every byte must come back exactly. Beside them, idle
connections must be closed by `idle_timeout` (not before it, nor much after), and at the
end a SIGTERM must drain a well-behaved client completely and give up on a stuck one at
`shutdown_timeout`.

`syn_flood`: hping3 floods the daemon's namespace with SYNs from random sources, bounded
in count and time, with syncookies on; probes on a clean link must keep being served, and
the daemon's CPU time during the flood must stay within 2x its time without it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tests.chaos.netns import REPO, Faults, Namespaces, inside
from tests.chaos.outcome import Row, probe_result
from tests.epolld_process import Daemon, write_config
from tests.soak_traffic import Traffic

PORT = 7000
IDLE_TIMEOUT_S = 8.0
IDLE_TICK_S = 1.0  # core/idle.py's tick for this timeout
IDLE_CONNS = 20
SHUTDOWN_TIMEOUT_S = 5.0
SLACK_S = 3.0  # what a lossy, slow link may add to a FIN's arrival
PROBE_CONNS = 5
FLOOD_S = 10.0
FLOOD_PACKETS = 400_000  # hping3 stops at this count, or at FLOOD_S, whichever comes first
FLOOD_CPU_RATIO_MAX = 2.0
SIOCOUTQ = 0x5411


def _config(directory: Path, trigger: str) -> Path:
    return write_config(
        directory / "epolld.yaml",
        {
            "listen": [f"0.0.0.0:{PORT}"],
            "trigger": trigger,
            "shutdown_timeout": f"{SHUTDOWN_TIMEOUT_S:g}s",
            "buffers": {"high_water": "256KiB", "low_water": "64KiB"},
            "limits": {"idle_timeout": f"{IDLE_TIMEOUT_S:g}s"},
            "logging": {"level": "info", "connections": False},
        },
    )


def _daemon_errors(daemon: Daemon) -> int:
    return len(daemon.bad_lines) + sum(
        1 for e in daemon.logs if e.get("level") in ("error", "critical")
    )


def _start_probe(ns: Namespaces, client: str, host: str, seconds: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            *ns.exec_prefix(client),
            sys.executable,
            "-m",
            "tests.chaos.probe",
            host,
            str(PORT),
            f"--conns={PROBE_CONNS}",
            f"--seconds={seconds}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )


def _idle_connections(client: str, host: str, row: Row) -> None:
    """Opens idle connections and checks that each is closed within the idle timeout's bounds."""
    with inside(client):
        socks = []
        for _ in range(IDLE_CONNS):
            sock = socket.create_connection((host, PORT), timeout=30)
            sock.sendall(b"idle?")
            got = b""
            while len(got) < 5:
                got += sock.recv(5 - len(got))
            row.bytes_verified += 5 if got == b"idle?" else 0
            socks.append((sock, time.monotonic()))
    for sock, quiet_since in socks:
        sock.settimeout(IDLE_TIMEOUT_S + IDLE_TICK_S + SLACK_S + 5)
        try:
            data = sock.recv(1)
        except OSError as e:
            row.require(False, f"an idle connection ended with {e!r}, not a FIN")
            continue
        finally:
            sock.close()
        waited = time.monotonic() - quiet_since
        row.require(data == b"", f"an idle connection received {data!r}")
        row.require_timing(
            IDLE_TIMEOUT_S - 0.5 <= waited <= IDLE_TIMEOUT_S + IDLE_TICK_S + SLACK_S,
            f"an idle connection was closed after {waited:.2f} s"
            f" (idle_timeout {IDLE_TIMEOUT_S:g}s)",
        )


def _unacked(sock: socket.socket) -> int:
    """Bytes the peer has not acknowledged yet (SIOCOUTQ)."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), SIOCOUTQ, b"\0\0\0\0"))[0]


def _drain_on_sigterm(daemon: Daemon, client: str, host: str, row: Row) -> None:
    """SIGTERM with a stuck client and one whose echo is still pending: the second gets all of it
    and a FIN (a drain echoes what arrived), the first is given up at shutdown_timeout."""
    payload = os.urandom(200_000)  # below high_water: the daemon reads it all and holds the rest
    with inside(client):
        stuck = socket.create_connection((host, PORT), timeout=30)
        pending = socket.create_connection((host, PORT), timeout=30)
    stuck.setblocking(False)
    with contextlib.suppress(
        BlockingIOError
    ):  # fills its echo and the buffers between; never reads
        for _ in range(1000):
            stuck.send(os.urandom(65536))
    pending.sendall(payload)
    deadline = time.monotonic() + 30
    while _unacked(pending) and time.monotonic() < deadline:  # all of it reached the daemon's host
        time.sleep(0.05)
    time.sleep(0.5)  # and the daemon has read it
    sent_at = time.monotonic()
    daemon.signal(signal.SIGTERM)
    received = bytearray()
    pending.settimeout(SHUTDOWN_TIMEOUT_S + 30)
    with contextlib.suppress(OSError):
        while chunk := pending.recv(65536):
            received.extend(chunk)
    code = daemon.wait(SHUTDOWN_TIMEOUT_S + 30)
    took = time.monotonic() - sent_at
    stuck.close()
    pending.close()
    complete = bytes(received) == payload
    row.require(complete, f"the draining client got {len(received):,} of {len(payload):,} bytes")
    row.bytes_verified += len(received) if complete else 0
    row.require(code == 0, f"the daemon exited {code} after SIGTERM")
    row.require_timing(
        SHUTDOWN_TIMEOUT_S - 0.5 <= took <= SHUTDOWN_TIMEOUT_S + SLACK_S,
        f"the drain with a stuck client took {took:.2f} s"
        f" (shutdown_timeout {SHUTDOWN_TIMEOUT_S:g}s)",
    )
    row.notes.append(f"SIGTERM with a stuck client: exit {code} after {took:.2f} s")


def bad_network(seconds: float, seed: int, trigger: str = "level") -> Row:
    faults = Faults()
    row = Row(f"4. bad network ({trigger})", faults=faults.describe())
    with tempfile.TemporaryDirectory() as tmp, Namespaces(f"chaos{os.getpid()}") as ns:
        client, host = ns.bad_link(faults, seed)
        daemon = Daemon(_config(Path(tmp), trigger), prefix=ns.exec_prefix(ns.server))
        try:
            daemon.wait_for("listening")
            traffic = Traffic(PORT, seed, host=host)

            def run_traffic() -> None:
                with inside(client):
                    traffic.run(time.monotonic() + seconds)

            runner = threading.Thread(target=run_traffic)
            runner.start()
            probe = _start_probe(ns, client, host, seconds)
            _idle_connections(client, host, row)
            runner.join(seconds + 120)
            result = probe_result(probe, 120)
            row.load = (
                f"{seconds:g} s: the soak's mix ({traffic.connections:,} connections) and"
                f" {PROBE_CONNS} probes over the link, {IDLE_CONNS} idle"
            )
            row.bytes_verified += traffic.verified + result["bytes_verified"]
            row.connections_lost += traffic.error_count + result["errors"]
            row.worst_latency_ms = result["max_ms"]
            row.notes.append(
                f"probes over the link: p50 {result['p50_ms']:.1f} ms,"
                f" p99 {result['p99_ms']:.1f} ms"
            )
            for message in traffic.errors + result["error_samples"]:
                row.failures.append(message)
            row.require(not runner.is_alive(), "the client mix did not finish")
            _drain_on_sigterm(daemon, client, host, row)
            row.errors = _daemon_errors(daemon)
        finally:
            daemon.stop()
    for counts in ns.relay_counts:
        row.faults += (
            f": {counts['lost']:,} packets lost, {counts['duplicated']:,} duplicated,"
            f" {counts['reordered']:,} reordered of {counts['forwarded']:,}"
        )
    return row


def _flood_ready() -> str | None:
    if subprocess.run(["which", "hping3"], capture_output=True).returncode != 0:
        subprocess.run([f"{REPO}/packaging/dev/apt-install", "hping3"], check=True)
    return None


def _cpu_during(daemon: Daemon, seconds: float) -> float:
    before = daemon.cpu_seconds()
    time.sleep(seconds)
    return daemon.cpu_seconds() - before


def syn_flood(seconds: float, seed: int, trigger: str = "level") -> Row:
    _flood_ready()
    row = Row(f"4. SYN flood ({trigger})")
    flood_s = min(FLOOD_S, max(3.0, seconds / 3))
    with tempfile.TemporaryDirectory() as tmp, Namespaces(f"chaosf{os.getpid()}") as ns:
        probes_ns, host = ns.clean_link()
        flood_ns, flood_host = ns.clean_link()
        ns.sysctl(ns.server, "net.ipv4.tcp_syncookies", "1")
        # SYN-ACKs to the random sources go out towards the flooder (which drops them): without a
        # route back the kernel would refuse each SYN at once and never queue or cookie one.
        ns.route_default(ns.server, flood_host.rsplit(".", 1)[0] + ".1")
        daemon = Daemon(_config(Path(tmp), trigger), prefix=ns.exec_prefix(ns.server))
        try:
            daemon.wait_for("listening")
            probe = _start_probe(ns, probes_ns, host, flood_s)
            quiet_cpu = _cpu_during(daemon, flood_s)
            quiet = probe_result(probe, 60)
            probe = _start_probe(ns, probes_ns, host, flood_s)
            flood = subprocess.Popen(
                [
                    *ns.exec_prefix(flood_ns),
                    "timeout",
                    f"{flood_s:g}",
                    "hping3",
                    "--quiet",
                    "-S",
                    "-p",
                    str(PORT),
                    "--rand-source",
                    "-i",
                    "u10",
                    "-c",
                    str(FLOOD_PACKETS),
                    flood_host,
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            flood_cpu = _cpu_during(daemon, flood_s)
            flood.wait(flood_s + 10)
            result = probe_result(probe, 60)
            cookies = _netstat(ns, "TcpExt", "SyncookiesSent")
            row.load = (
                f"{PROBE_CONNS} probes on a clean link,"
                f" {flood_s:g} s without and {flood_s:g} s with the flood"
            )
            row.faults = (
                f"hping3 SYNs from random sources for {flood_s:g} s: {cookies:,} syncookies sent"
            )
            row.bytes_verified = quiet["bytes_verified"] + result["bytes_verified"]
            row.connections_lost = quiet["errors"] + result["errors"]
            row.worst_latency_ms = result["max_ms"]
            row.errors = _daemon_errors(daemon)
            ratio = flood_cpu / quiet_cpu if quiet_cpu > 0 else float("inf")
            row.notes.append(
                f"daemon CPU {quiet_cpu:.2f} s without the flood,"
                f" {flood_cpu:.2f} s with it ({ratio:.2f}x);"
                f" probes p99 {quiet['p99_ms']:.1f} ms without, {result['p99_ms']:.1f} ms with it"
            )
            row.failures.extend(quiet["error_samples"] + result["error_samples"])
            row.require(cookies > 0, "the flood never made the kernel send a syncookie")
            row.require_timing(
                ratio <= FLOOD_CPU_RATIO_MAX, f"the daemon's CPU grew {ratio:.2f}x under the flood"
            )
            row.require(result["round_trips"] > 0, "the probes made no round trip")
        finally:
            daemon.stop()
    return row


def _netstat(ns: Namespaces, group: str, name: str) -> int:
    text = subprocess.run(
        [*ns.exec_prefix(ns.server), "cat", "/proc/net/netstat"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    for keys, values in zip(text[::2], text[1::2], strict=True):
        if keys.startswith(group + ":"):
            table = dict(zip(keys.split()[1:], values.split()[1:], strict=True))
            return int(table.get(name, 0))
    return 0
