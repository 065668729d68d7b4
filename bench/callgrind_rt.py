#!/usr/bin/env python3
"""Instructions per 1 KiB round trip of the epolld server, counted by callgrind.

Usage: bench/callgrind_rt.py [--trigger level|edge] [--io copy|splice] [--tls] [--src DIR]

The daemon runs under `valgrind --tool=callgrind` (one process, its own session) while a
client on one loopback connection does SHORT then LONG round trips of 1 KiB; each run's
total instruction count includes start-up and shutdown, so the figure is the difference
of two runs divided by the difference of their round trips (callgrind_harness.py).
--src runs another checkout's epolld (PYTHONPATH) with the same interpreter, for a
before/after pair. --tls serves TLS 1.3 (a self-signed ECDSA P-256 certificate made in the
temporary directory) to a Python ssl client: the handshake is in both runs and cancels
out; the client is not counted.
"""

from __future__ import annotations

import argparse
import socket
import ssl
import subprocess
import tempfile
from pathlib import Path

from callgrind_harness import run_daemon  # bench/, first on sys.path when run as a script

SHORT, LONG = 2_000, 12_000
MESSAGE = bytes(range(256)) * 4  # 1 KiB


def run_once(round_trips: int, trigger: str, io: str, src: Path, tmp: Path, tls: bool) -> int:
    listen = '["127.0.0.1:0"]'
    if tls:
        listen = '[{address: "127.0.0.1:0", tls: true}]'
        listen += f'\ntls: {{certificate: "{tmp / "cert.pem"}", key: "{tmp / "key.pem"}"}}'
    config = f"listen: {listen}\ntrigger: {trigger}\nio: {io}\n"

    def exercise(port: int) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as plain:
            plain.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = _client_tls().wrap_socket(plain) if tls else plain
            for _ in range(round_trips):
                sock.sendall(MESSAGE)
                got = 0
                while got < len(MESSAGE):
                    chunk = sock.recv(len(MESSAGE) - got)
                    if not chunk:
                        raise SystemExit("connection closed early")
                    got += len(chunk)

    return run_daemon(config, tmp, str(round_trips), src, exercise)


def _client_tls() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the handshake is not what is measured
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    return context


def _make_certificate(tmp: Path) -> None:
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(tmp / "key.pem"), "-out", str(tmp / "cert.pem"),
         "-days", "30", "-subj", "/CN=localhost"],
        check=True, capture_output=True,
    )  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trigger", default="level", choices=["level", "edge"])
    parser.add_argument("--io", default="copy", choices=["copy", "splice"])
    parser.add_argument("--tls", action="store_true", help="serve TLS 1.3 (issue 21)")
    parser.add_argument("--src", type=Path, default=Path(__file__).resolve().parent.parent)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if args.tls:
            _make_certificate(tmp)
        short = run_once(SHORT, args.trigger, args.io, args.src, tmp, args.tls)
        long = run_once(LONG, args.trigger, args.io, args.src, tmp, args.tls)
    per_rt = (long - short) / (LONG - SHORT)
    kind = "TLS 1.3 " if args.tls else ""
    print(
        f"{args.trigger}/{args.io} src={args.src}: {per_rt:,.0f} instructions per 1 KiB"
        f" {kind}round trip"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
