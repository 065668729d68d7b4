#!/usr/bin/env python3
"""Instructions per UDP datagram echoed by the epolld server, counted by callgrind.

Usage: bench/callgrind_udp.py [--batch K] [--size BYTES] [--limits off|on] [--single]
       [--trigger level|edge] [--src DIR]

The daemon runs under `valgrind --tool=callgrind` while a client sends K datagrams, waits
for their K echoes, and repeats, for SHORT then LONG datagrams in all; the figure is the
difference of the two runs' instruction counts divided by the difference of their
datagrams (start-up and shutdown cancel out). Callgrind counts user-space instructions
only: this is the interpreter's work per datagram, what recvmmsg/sendmmsg batches are to
remove (issue 24), deterministic on this noisy machine where CPU time is not. The kernel's
share is the C servers' (bench/run measures that). --single runs the daemon under a
seccomp filter refusing recvmmsg/sendmmsg (tests/seccomp_exec.py): its fallback, one
recvfrom and one sendto per datagram, for a before/after pair in one checkout.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
from pathlib import Path

from callgrind_harness import run_daemon  # bench/, first on sys.path when run as a script

SHORT, LONG = 1_024, 5_120  # datagrams; multiples of every batch size asked for
ROOT = Path(__file__).resolve().parent.parent
LIMITS = {
    "off": "udp: {rate: 0, byte_rate: 0, total_rate: 0}",
    # The shipped limiter's work per datagram (buckets per source and in total, the table)
    # with rates no bench load reaches, so every datagram is still echoed.
    "on": "udp: {rate: 10000000, burst: 10000000, byte_rate: 1GiB, total_rate: 10000000}",
}


def run_once(datagrams: int, args: argparse.Namespace, tmp: Path) -> int:
    config = f'listen: ["udp:127.0.0.1:0"]\ntrigger: {args.trigger}\n{LIMITS[args.limits]}\n'
    prefix = []
    if args.single:
        prefix = [sys.executable, str(ROOT / "tests" / "seccomp_exec.py"),
                  "--deny", "recvmmsg,sendmmsg", "--errno", "EPERM", "--"]  # fmt: skip
    payload = bytes(range(256)) * (args.size // 256) + bytes(args.size % 256)

    def exercise(port: int) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            sock.connect(("127.0.0.1", port))
            sock.settimeout(60)
            for _ in range(datagrams // args.batch):
                for _ in range(args.batch):
                    sock.send(payload)
                for _ in range(args.batch):
                    if sock.recv(65536) != payload:
                        raise SystemExit("a reply differs from its datagram")

    return run_daemon(config, tmp, str(datagrams), args.src, exercise, prefix)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="datagrams per round")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--limits", default="off", choices=list(LIMITS))
    parser.add_argument("--single", action="store_true", help="recvmmsg/sendmmsg refused")
    parser.add_argument("--trigger", default="level", choices=["level", "edge"])
    parser.add_argument("--src", type=Path, default=ROOT)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        short = run_once(SHORT, args, tmp)
        long = run_once(LONG, args, tmp)
    per = (long - short) / (LONG - SHORT)
    path = "recvfrom/sendto" if args.single else "recvmmsg/sendmmsg"
    print(f"{args.trigger} {path} batch={args.batch} size={args.size} limits={args.limits}: "
          f"{per:,.0f} instructions per datagram")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
