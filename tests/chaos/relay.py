"""A bad link between two network namespaces: a TUN device in each, and this relay between.

    python -m tests.chaos.relay NS_A DEV_A NS_B DEV_B --loss 0.05 --delay-ms 50 --jitter-ms 20
                                --duplicate 0.01 --seed N

The kernel here has no netem qdisc, so the faults are applied in user space: each packet read
from one device is dropped with probability `loss`, or written to the other device after
delay ± jitter (drawn per packet, so packets overtake each other: reordering), and written a
second time with probability `duplicate`. At most MAX_QUEUED packets wait; more are dropped,
as a router's queue would. The relay prints "ready" once both devices exist, prints its
counts as one line of JSON when it ends, and ends on SIGTERM or when its stdin closes (its
parent died), so it never outlives the test.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import heapq
import json
import os
import random
import select
import signal
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
CLONE_NEWNET = 0x40000000
MAX_PACKET = 65536
MAX_QUEUED = 4096

_libc = ctypes.CDLL(None, use_errno=True)


def enter_netns(name: str) -> None:
    """Moves the calling thread into network namespace `name` (made by `ip netns add`)."""
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


def open_tun(netns: str, device: str) -> int:
    """A TUN device `device` in `netns`, without packet information; it lives while the fd does."""
    enter_netns(netns)
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", device.encode(), IFF_TUN | IFF_NO_PI))
    return fd


class Link:
    """The faults: which packets go, when, and how often."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.rng = random.Random(args.seed)
        self.loss = args.loss
        self.duplicate = args.duplicate
        self.delay = args.delay_ms / 1000
        self.jitter = args.jitter_ms / 1000
        self.queue: list[tuple[float, int, int, bytes]] = []
        self.seq = 0
        self.counts = {"forwarded": 0, "lost": 0, "duplicated": 0, "overflowed": 0, "reordered": 0}
        self._last_due: dict[int, float] = {}

    def take(self, packet: bytes, to_fd: int, now: float) -> None:
        if self.rng.random() < self.loss:
            self.counts["lost"] += 1
            return
        copies = 2 if self.rng.random() < self.duplicate else 1
        self.counts["duplicated"] += copies - 1
        for _ in range(copies):
            if len(self.queue) >= MAX_QUEUED:
                self.counts["overflowed"] += 1
                return
            due = now + max(0.0, self.delay + self.rng.uniform(-self.jitter, self.jitter))
            if due < self._last_due.get(to_fd, 0.0):
                self.counts["reordered"] += 1
            self._last_due[to_fd] = max(due, self._last_due.get(to_fd, 0.0))
            self.seq += 1
            heapq.heappush(self.queue, (due, self.seq, to_fd, packet))

    def release(self, now: float) -> None:
        while self.queue and self.queue[0][0] <= now:
            _, _, to_fd, packet = heapq.heappop(self.queue)
            try:
                os.write(to_fd, packet)
                self.counts["forwarded"] += 1
            except OSError:  # the device's queue is full or it is going away: a lost packet
                self.counts["lost"] += 1

    def timeout(self, now: float) -> float:
        return max(0.0, self.queue[0][0] - now) if self.queue else 1.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("netns_a")
    parser.add_argument("device_a")
    parser.add_argument("netns_b")
    parser.add_argument("device_b")
    parser.add_argument("--loss", type=float, default=0.0)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--duplicate", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    fd_a = open_tun(args.netns_a, args.device_a)
    fd_b = open_tun(args.netns_b, args.device_b)
    other = {fd_a: fd_b, fd_b: fd_a}
    link = Link(args)
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    poller = select.poll()
    for fd in (fd_a, fd_b, sys.stdin.fileno()):
        poller.register(fd, select.POLLIN)
    print("ready", flush=True)
    while not stopping:
        now = time.monotonic()
        for fd, _ in poller.poll(max(1, int(link.timeout(now) * 1000 + 0.999))):
            if fd == sys.stdin.fileno():
                if not os.read(fd, 4096):
                    stopping = True
                continue
            for _ in range(64):  # a bounded batch per wakeup, so that both directions get turns
                try:
                    packet = os.read(fd, MAX_PACKET)
                except BlockingIOError:
                    break
                link.take(packet, other[fd], time.monotonic())
        link.release(time.monotonic())
    print(json.dumps(link.counts), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
