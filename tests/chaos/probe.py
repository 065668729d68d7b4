"""Well-behaved clients that measure: ping-pong round trips, every echo checked.

    python -m tests.chaos.probe HOST PORT --conns 10 --seconds 30 [--size 64] [--interval 0.01]

Each connection sends `size` random bytes, waits for exactly those bytes back, records the
round trip, sleeps `interval`, and goes again, until the time is up; then it half-closes
and expects EOF. It runs as a process of its own (started with `ip netns exec` where the
campaign needs another namespace), so that the campaign's other load cannot hold it up on
the GIL, and prints one line of JSON: round trips, bytes verified, errors, latency
percentiles in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import sys
import time
from typing import Any

CONNECT_TIMEOUT_S = 10.0
SLOW_MS = 10.0  # round trips this long are also counted per second of the run
STALL_S = 30.0
MAX_ERRORS_KEPT = 20


class Probe:
    def __init__(self, sock: socket.socket, size: int) -> None:
        self.sock = sock
        self.size = size
        self.payload = b""
        self.got = bytearray()
        self.sent_at = 0.0
        self.due = 0.0  # when to send the next one; 0: now
        self.closing = False
        self.done = False


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(p / 100 * len(sorted_values)))]


def run(
    host: str,
    port: int,
    conns: int,
    seconds: float,
    size: int,
    interval: float,
    after_s: float = 0.0,
) -> dict[str, Any]:
    """after_s: p99_after_ms counts only round trips begun that long after the start."""
    errors: list[str] = []
    error_count = 0
    latencies: list[float] = []
    later: list[float] = []  # the round trips begun after after_s
    slow_by_second: dict[int, int] = {}  # when the slow round trips happened
    verified = 0

    def error(message: str) -> None:
        nonlocal error_count
        error_count += 1
        if len(errors) < MAX_ERRORS_KEPT:
            errors.append(message)

    sel = selectors.DefaultSelector()
    probes: list[Probe] = []
    for _ in range(conns):
        try:
            sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
        except OSError as e:
            error(f"connect failed: {e!r}")
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        probe = Probe(sock, size)
        probes.append(probe)
        sel.register(sock, selectors.EVENT_READ, probe)
    stop_at = time.monotonic() + seconds
    while any(not p.done for p in probes):
        now = time.monotonic()
        for probe in probes:
            if probe.done or probe.payload or probe.closing:
                continue
            if now >= stop_at:
                probe.closing = True
                probe.sock.shutdown(socket.SHUT_WR)
            elif now >= probe.due:
                probe.payload = os.urandom(size)
                probe.sent_at = now
                try:  # a small payload on a connection with nothing in flight always fits
                    probe.sock.send(probe.payload)
                except OSError as e:
                    error(f"send failed: {e!r}")
                    probe.done = True
        for key, _ in sel.select(0.005):
            probe = key.data
            try:
                data = probe.sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError as e:
                error(f"recv failed: {e!r}")
                probe.done = True
                continue
            now = time.monotonic()
            if not data:
                if probe.payload and len(probe.got) < len(probe.payload):
                    error(f"EOF after {len(probe.got)} of {len(probe.payload)} bytes")
                elif not probe.closing:
                    error("EOF before the client closed")
                probe.done = True
                continue
            probe.got += data
            if probe.got != probe.payload[: len(probe.got)]:
                error("echo differs from what was sent")
                probe.done = True
                continue
            if len(probe.got) == len(probe.payload):
                latencies.append(now - probe.sent_at)
                begun_s = probe.sent_at - stop_at + seconds
                if begun_s >= after_s:
                    later.append(now - probe.sent_at)
                if now - probe.sent_at >= SLOW_MS / 1000:
                    slow_by_second[int(begun_s)] = slow_by_second.get(int(begun_s), 0) + 1
                verified += len(probe.payload)
                probe.payload, probe.got = b"", bytearray()
                probe.due = now + interval
        now = time.monotonic()
        for probe in probes:
            if not probe.done and probe.payload and now - probe.sent_at > STALL_S:
                error(f"no echo for {STALL_S:.0f} s")
                probe.done = True
        if now > stop_at + STALL_S:
            for probe in probes:
                if not probe.done:
                    error("no EOF after the client closed")
                    probe.done = True
    for probe in probes:
        probe.sock.close()
    latencies.sort()
    ms = [v * 1000 for v in latencies]
    return {
        "round_trips": len(ms),
        "bytes_verified": verified,
        "errors": error_count,
        "error_samples": errors,
        "p50_ms": percentile(ms, 50),
        "p99_ms": percentile(ms, 99),
        "max_ms": ms[-1] if ms else 0.0,
        "slow_by_second": slow_by_second,
        "p99_after_ms": percentile(sorted(v * 1000 for v in later), 99),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--conns", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--interval", type=float, default=0.01)
    parser.add_argument("--after", type=float, default=0.0, help="seconds before p99_after_ms")
    args = parser.parse_args(argv)
    result = run(
        args.host, args.port, args.conns, args.seconds, args.size, args.interval, args.after
    )
    print(json.dumps(result), flush=True)
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
