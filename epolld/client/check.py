"""--check: random messages on each connection, every echoed byte verified, the figures.

Messages go ping-pong (each waits for the previous echo) or pipelined (up to
--window bytes in flight), at most --rate per second per connection when asked,
for --count messages or --duration seconds.
"""

from __future__ import annotations

import argparse
import random
import time

from epolld.client.connect import Options, Target, connect, finish
from epolld.client.engine import Connection, run
from epolld.client.errors import Mismatch
from epolld.client.payload import random_messages, random_pool
from epolld.client.report import Report, latency_line, latency_summary, rate


def format_size(size: tuple[int, int]) -> str:
    return f"{size[0]} B" if size[0] == size[1] else f"{size[0]}-{size[1]} B"


def run_check(args: argparse.Namespace, target: Target, options: Options) -> Report:
    """Send random messages on each connection, verify the echo and return the figures.

    Raises:
        ClientError: a connection failed or the echo differs.
    """
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    window = args.window if args.mode == "pipelined" else None
    pool = random_pool(seed)
    connections: list[Connection] = []
    try:
        for number in range(1, args.connections + 1):
            label = str(target) if args.connections == 1 else f"{target} (connection {number})"
            sock = connect(target, args.timeout, options)
            connection = Connection(sock, label, window, interval=args.interval)
            connections.append(connection)
            connection.feed(random_messages(pool, seed, number, args.count, args.size))
            connection.count = args.count
        started = time.perf_counter()
        if args.duration is not None:
            for connection in connections:
                connection.stop_at = time.monotonic() + args.duration
        try:
            run(connections, args.timeout)
        except Mismatch as exc:
            raise Mismatch(f"{exc}\n  (--seed {seed} sends the same messages again)") from None
        elapsed = time.perf_counter() - started
        for connection in connections:
            finish(connection.sock)
    finally:
        for connection in connections:
            connection.sock.close()
    latencies = [t for c in connections for t in c.latencies]
    total_bytes = sum(c.bytes_received for c in connections)
    messages = len(latencies)
    what = "first byte sent" if window is None else "last byte sent"
    summary = latency_summary(latencies)
    plural = "s" if args.connections != 1 else ""
    report = Report("echo", str(target))
    report.lines = [
        f"check passed: {messages} messages, {total_bytes} bytes echoed intact by {target}"
        f" over {args.connections} connection{plural}",
        f"mode {args.mode}, sizes {format_size(args.size)}, seed {seed}",
        latency_line(summary, f"{what} to last byte echoed"),
        f"throughput: {rate(total_bytes, elapsed) / 1e6:.2f} MB/s echoed (MB = 10^6 bytes),"
        f" {rate(messages, elapsed):.0f} messages/s, in {elapsed:.3f} s",
    ]
    report.figures = {
        "transport": "tls" if options.tls is not None else "stream",
        "check_mode": args.mode,
        "connections": args.connections,
        "messages": messages,
        "bytes_echoed": total_bytes,
        "size_min": args.size[0],
        "size_max": args.size[1],
        "seed": seed,
        "elapsed_s": elapsed,
        "latency_ms": summary,
        "latency_from": what,
        "throughput_bytes_per_s": rate(total_bytes, elapsed),
        "messages_per_s": rate(messages, elapsed),
    }
    return report
