"""--udp: numbered, timestamped datagrams to a UDP echo server; loss, duplicates,
reordering and the latency of each datagram.

Each datagram carries a header (magic, connection number, sequence number, the
send time in nanoseconds) and then bytes of the seeded pool chosen by its sequence
number, so an echo is verified whole and its latency read from its own payload.
Datagrams go at --rate per second per socket (default DEFAULT_RATE); after the last
one the client waits for late echoes, then counts what never came back as lost.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import select
import socket
import struct
import time
from collections.abc import Sequence

from epolld.client.connect import Options, Target, open_datagram
from epolld.client.engine import next_start
from epolld.client.errors import EXIT_MISMATCH, Refused, TimedOut
from epolld.client.payload import POOL_SIZE, random_pool
from epolld.client.report import Report, latency_line, latency_summary, rate

HEADER = struct.Struct("!4sIQQ")  # magic, connection, sequence, send time (perf_counter_ns)
MAGIC = b"EPDU"
DEFAULT_RATE = 1000.0  # datagrams per second per socket when neither --rate nor --interval
LINGER_MIN_S = 0.5  # at least this long for late echoes after the last datagram
LINGER_LATENCIES = 4  # ... or this many times the slowest round trip seen
RECV_MAX = 65536


@dataclasses.dataclass(slots=True)
class Flow:
    """One UDP socket's datagrams: what was sent, what came back, and in which order."""

    number: int
    sizes: list[int] = dataclasses.field(default_factory=list)  # by sequence number
    seen: set[int] = dataclasses.field(default_factory=set)
    highest: int = -1
    duplicates: int = 0
    reordered: int = 0
    corrupt: int = 0
    latencies: list[float] = dataclasses.field(default_factory=list)
    next_start: float | None = None


def datagram(pool: memoryview, flow: int, sequence: int, size: int) -> bytes:
    """The datagram of this flow and sequence number, size bytes long, stamped now."""
    body = _body(pool, sequence, size - HEADER.size)
    return HEADER.pack(MAGIC, flow, sequence, time.perf_counter_ns()) + body


def _body(pool: memoryview, sequence: int, length: int) -> bytes:
    offset = (sequence * 7919) % POOL_SIZE  # a prime stride: neighbours differ
    return bytes(pool[offset : offset + length])


def receive(flow: Flow, data: bytes, pool: memoryview, now_ns: int) -> None:
    """Account for one echoed datagram of flow."""
    if len(data) < HEADER.size:
        flow.corrupt += 1
        return
    magic, number, sequence, sent_ns = HEADER.unpack_from(data)
    if (
        magic != MAGIC
        or number != flow.number
        or sequence >= len(flow.sizes)
        or len(data) != flow.sizes[sequence]
        or data[HEADER.size :] != _body(pool, sequence, len(data) - HEADER.size)
    ):
        flow.corrupt += 1
        return
    if sequence in flow.seen:
        flow.duplicates += 1
        return
    flow.seen.add(sequence)
    if sequence < flow.highest:
        flow.reordered += 1
    flow.highest = max(flow.highest, sequence)
    flow.latencies.append((now_ns - sent_ns) / 1e9)


def run_udp(args: argparse.Namespace, target: Target, options: Options) -> Report:
    """Send the datagrams of every socket at the rate, collect the echoes, count.

    Raises:
        Refused: nothing listens (ICMP port unreachable).
        TimedOut: not one datagram came back.
    """
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    pool = random_pool(seed)
    rng = random.Random(seed)
    interval = args.interval if args.interval is not None else 1 / DEFAULT_RATE
    count = args.count if args.count is not None or args.duration is None else None
    socks = [open_datagram(target, options) for _ in range(args.connections)]
    flows = [Flow(number) for number in range(1, args.connections + 1)]
    poller = select.poll()
    for sock in socks:
        poller.register(sock, select.POLLIN)
    started = time.monotonic()
    stop_at = started + args.duration if args.duration is not None else math.inf
    last_sent = started
    try:
        while True:
            now = time.monotonic()
            sending = [
                i
                for i, flow in enumerate(flows)
                if (count is None or len(flow.sizes) < count) and now < stop_at
            ]
            for i in sending:
                flow = flows[i]
                if flow.next_start is None or now >= flow.next_start:
                    size = rng.randint(*args.size)
                    try:
                        socks[i].send(datagram(pool, flow.number, len(flow.sizes), size))
                    except ConnectionRefusedError:
                        raise _refused(target) from None
                    except BlockingIOError:  # the send buffer is full: a millisecond later
                        flow.next_start = now + 0.001
                        continue
                    flow.sizes.append(size)
                    flow.next_start = next_start(flow.next_start, now, interval)
                    last_sent = now
            if sending:
                wake = min(flows[i].next_start or now for i in sending)
            else:
                if all(len(f.seen) == len(f.sizes) for f in flows):
                    break
                slowest = max((t for f in flows for t in f.latencies), default=0.0)
                linger = max(LINGER_MIN_S, LINGER_LATENCIES * slowest)
                if args.timeout is not None:
                    linger = min(linger, args.timeout)
                wake = last_sent + linger
                if now >= wake:
                    break
            for fd, _ in poller.poll(max(0, math.ceil((wake - now) * 1000))):
                i = next(i for i, s in enumerate(socks) if s.fileno() == fd)
                _drain(socks[i], flows[i], pool, target)
    finally:
        for sock in socks:
            sock.close()
    elapsed = last_sent - started
    return _report(args, target, flows, seed, elapsed)


def _drain(sock: socket.socket, flow: Flow, pool: memoryview, target: Target) -> None:
    """Account for every datagram waiting on sock."""
    while True:
        try:
            data = sock.recv(RECV_MAX)
        except BlockingIOError:
            return
        except ConnectionRefusedError:
            raise _refused(target) from None
        receive(flow, data, pool, time.perf_counter_ns())


def _refused(target: Target) -> Refused:
    return Refused(f"nothing listens on UDP {target} (ICMP port unreachable)")


def _report(
    args: argparse.Namespace, target: Target, flows: Sequence[Flow], seed: int, elapsed: float
) -> Report:
    sent = sum(len(f.sizes) for f in flows)
    received = sum(len(f.seen) for f in flows)
    lost = sent - received
    duplicates = sum(f.duplicates for f in flows)
    reordered = sum(f.reordered for f in flows)
    corrupt = sum(f.corrupt for f in flows)
    summary = latency_summary([t for f in flows for t in f.latencies])
    loss_percent = 100 * lost / sent if sent else 0.0
    report = Report("udp", f"udp:{target}")
    report.lines = [
        f"udp: {sent} datagrams sent to {target} over {len(flows)} socket"
        f"{'s' if len(flows) != 1 else ''}, {received} echoed, {lost} lost"
        f" ({loss_percent:.1f}%), {duplicates} duplicated, {reordered} reordered,"
        f" {corrupt} corrupt",
        f"sizes {args.size[0]}-{args.size[1]} B, seed {seed},"
        f" {rate(sent, elapsed):.0f} datagrams/s sent in {elapsed:.3f} s",
        latency_line(summary, "datagram sent to its echo received"),
    ]
    report.figures = {
        "transport": "udp",
        "connections": len(flows),
        "sent": sent,
        "received": received,
        "lost": lost,
        "loss_percent": loss_percent,
        "duplicates": duplicates,
        "reordered": reordered,
        "corrupt": corrupt,
        "size_min": args.size[0],
        "size_max": args.size[1],
        "seed": seed,
        "elapsed_s": elapsed,
        "latency_ms": summary,
        "latency_from": "datagram sent to its echo received",
        "datagrams_per_s": rate(sent, elapsed),
    }
    if corrupt:
        report.exit_code = EXIT_MISMATCH
        report.problem = f"{corrupt} echoed datagrams differ from every datagram sent"
    elif sent and not received:
        raise TimedOut(f"none of the {sent} datagrams sent to {target} came back")
    return report
