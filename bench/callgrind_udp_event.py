#!/usr/bin/env python3
"""Instructions the interpreter spends in UdpEndpoint.on_event per datagram, by callgrind.

Usage: bench/callgrind_udp_event.py [--batch K] [--rounds R] [--limits off|on] [--single]

In one process (under `valgrind --tool=callgrind --toggle-collect=functools_reduce`): an
endpoint on 127.0.0.1 and a client; each round queues K datagrams of 64 bytes, hands the
endpoint ONE event (inside functools.reduce, the only code collected), then reads the K
echoes. So the count is on_event's alone, for batches of exactly K: user-space
instructions (the kernel's are not counted), deterministic on a noisy machine.
--single takes the recvfrom/sendto fallback. --limits on: the limiter with rates no load
reaches (every datagram admitted). bench/callgrind_udp.py measures the whole daemon.
"""

from __future__ import annotations

import argparse
import functools
import select
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from callgrind_harness import instructions  # bench/, first on sys.path as a script

ROOT = Path(__file__).resolve().parent.parent


def child(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT))
    from epolld.config import UdpConfig, parse_address
    from epolld.listening import sockets as listeners
    from epolld.udp.endpoint import UdpEndpoint, UdpStats
    from epolld.udp.ratelimit import UdpLimiter

    class Clock:
        now = 1000.0

        def reschedule(self, item: tuple[int, int]) -> None:
            pass

    if args.limits == "on":
        settings = UdpConfig(rate=10**7, burst=10**7, byte_rate_bytes=2**30, total_rate=10**7)
    else:
        settings = UdpConfig(rate=0, byte_rate_bytes=0, total_rate=0)
    stats = UdpStats()
    listener = listeners.bind(parse_address("udp:127.0.0.1:0"), 0)
    listener.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    endpoint = UdpEndpoint(listener, Clock(), UdpLimiter(settings, Clock.now), stats,
                           edge=False, max_datagram=settings.max_datagram_bytes)  # fmt: skip
    if args.single:
        endpoint._batched = False  # the fallback, as when the calls are refused
        endpoint.set_max_datagram(settings.max_datagram_bytes)
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    c.connect(listener.sock.getsockname())
    payload = b"x" * 64

    def step(_a: int, _b: int) -> int:
        endpoint.on_event(select.EPOLLIN)
        return 0

    for _ in range(args.rounds):
        for _ in range(args.batch):
            c.send(payload)
        functools.reduce(step, (0, 0))  # collected
        for _ in range(args.batch):
            c.recv(100)
    assert stats.echoed == args.rounds * args.batch, (stats.echoed, stats.dropped)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--limits", default="off", choices=["off", "on"])
    parser.add_argument("--single", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "callgrind.out"
        subprocess.run(
            ["valgrind", "--tool=callgrind", "--toggle-collect=functools_reduce",
             f"--callgrind-out-file={out}", sys.executable, __file__, "--child",
             "--batch", str(args.batch), "--rounds", str(args.rounds), "--limits", args.limits,
             *(["--single"] if args.single else [])],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=1800,
        )  # fmt: skip
        total = instructions(out)
    path = "recvfrom/sendto" if args.single else "recvmmsg/sendmmsg"
    per = total / (args.batch * args.rounds)
    print(f"{path} batch={args.batch} limits={args.limits}: {per:,.0f} instructions per datagram")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
