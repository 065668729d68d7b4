"""epolld-client's command line: arguments, what runs, what is printed, exit codes.

Modes: interactive (the default), --check (a stream echo verified byte for byte),
--udp (datagrams: loss, duplicates, reordering) and --service discard|chargen|info.
Every measuring mode prints a few lines, or with --json one object.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import sys
from collections.abc import Sequence

from epolld import __version__
from epolld.client.check import run_check
from epolld.client.connect import Options, Target, tls_context
from epolld.client.errors import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    MEANINGS,
    ClientError,
)
from epolld.client.interactive import run_interactive
from epolld.client.proxy_header import parse_source
from epolld.client.report import Report, to_json
from epolld.client.services import run_chargen, run_discard, run_info
from epolld.client.udp import HEADER, run_udp

DEFAULT_WINDOW = 256 * 1024  # bytes in flight per connection in pipelined mode
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_COUNT = 100

_SIZE_UNITS = {"": 1, "b": 1, "kib": 1024, "mib": 1024**2, "gib": 1024**3}
_AMBIGUOUS_UNITS = {"k": "KiB", "kb": "KiB", "m": "MiB", "mb": "MiB", "g": "GiB", "gb": "GiB"}
_MEASURE_OPTIONS = (
    "count", "size", "connections", "seed", "rate", "interval", "duration", "json",
)  # fmt: skip
_TLS_OPTIONS = ("ca", "cert", "key", "sni", "insecure")

EPILOG = """\
modes:
  interactive (default)  prompt "Input Something:", send the line, print "Receive: <echo>";
                         with stdin not a terminal, print only the echoes. Ctrl-D ends.
  --check                send --count random messages per connection, verify every echoed
                         byte, print latency (p50, p90, p99, p99.9, max) and throughput.
  --udp                  the same with numbered datagrams: count loss, duplicates and
                         reordering, and the latency of each datagram.
  --service NAME         discard: one-way throughput; chargen: check RFC 864's pattern;
                         info: print what the server saw of this client.
  --json                 one JSON object with every figure and the exit status's meaning.

sizes: bytes (64, 64B), KiB, MiB or GiB (1024-based; KB and MB are refused as ambiguous,
as in epolld's config); --size MIN-MAX draws each message's size from that range.

exit codes:
""" + "".join(f"  {code:<3} {meaning}\n" for code, meaning in MEANINGS.items())


def parse_size(text: str) -> int:
    """Parse a byte count such as 64, 64B, 1KiB or 1MiB, as epolld's config does.

    K, KB, M, MB, G and GB are refused as ambiguous (1000 or 1024?), like in
    the config file, so that one spelling means the same in both places.

    Raises:
        argparse.ArgumentTypeError: not a positive size, or an ambiguous unit.
    """
    match = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if match and unit in _AMBIGUOUS_UNITS:
        better = _AMBIGUOUS_UNITS[unit]
        raise argparse.ArgumentTypeError(
            f"ambiguous unit in {text!r}: write {better} (1024-based) or bytes"
        )
    if not match or unit not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 64, 1KiB, 1MiB)")
    size = int(match.group(1)) * _SIZE_UNITS[unit]
    if size < 1:
        raise argparse.ArgumentTypeError(f"size must be at least 1 byte: {text!r}")
    return size


def parse_size_range(text: str) -> tuple[int, int]:
    """Parse SIZE or MIN-MAX into (min, max) byte counts.

    Raises:
        argparse.ArgumentTypeError: not a size or range, or MIN > MAX.
    """
    low_text, dash, high_text = text.partition("-")
    low = parse_size(low_text)
    high = parse_size(high_text) if dash else low
    if low > high:
        raise argparse.ArgumentTypeError(f"empty size range: {text!r}")
    return low, high


def parse_tos(text: str) -> int:
    """A TOS byte: decimal or 0x hex, 0-255."""
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a TOS byte: {text!r} (try 0xb8 or 184)") from None
    if not 0 <= value <= 255:
        raise argparse.ArgumentTypeError(f"a TOS byte is 0-255, got {text!r}")
    return value


def parse_positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be above 0: {text!r}")
    return value


def parse_source_arg(text: str) -> tuple[str, int]:
    try:
        return parse_source(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not ADDR:PORT with a literal address: {text!r} (e.g. 192.0.2.1:4000)"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    """Return the argparse parser for epolld-client."""
    parser = argparse.ArgumentParser(
        prog="epolld-client",
        description="Talk to an echo server interactively, or measure it: --check, --udp,"
        " --service.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    where = parser.add_argument_group("where")
    where.add_argument("--host", help="host name or address (default 127.0.0.1)")
    where.add_argument("--port", type=int, help="TCP or UDP port (default 7080)")
    where.add_argument("--unix", metavar="PATH", help="connect to a Unix stream socket instead")
    family = where.add_mutually_exclusive_group()
    family.add_argument("-4", dest="ipv4", action="store_true", help="IPv4 addresses only")
    family.add_argument("-6", dest="ipv6", action="store_true", help="IPv6 addresses only")
    where.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"limit for connecting and for each wait for the server; 0 waits forever"
        f" (default {DEFAULT_TIMEOUT_S:g})",
    )
    how = parser.add_argument_group("how")
    how.add_argument("--udp", action="store_true", help="datagrams instead of a stream")
    how.add_argument("--tls", action="store_true", help="speak TLS (after any PROXY header)")
    how.add_argument("--ca", metavar="FILE", help="--tls: trust these CAs (default the system's)")
    how.add_argument("--cert", metavar="FILE", help="--tls: our certificate, for mutual TLS")
    how.add_argument("--key", metavar="FILE", help="--tls: its key (default: in --cert's file)")
    how.add_argument(
        "--sni",
        metavar="NAME",
        help="--tls: the server name to ask for and verify (default --host)",
    )
    how.add_argument(
        "--insecure", action="store_true", help="--tls: do not verify the server's certificate"
    )
    how.add_argument(
        "--tos", type=parse_tos, metavar="BYTE", help="IP TOS / IPv6 traffic class (0xb8: EF)"
    )
    how.add_argument(
        "--proxy-header",
        choices=["v1", "v2"],
        help="begin with a PROXY protocol header, as a load balancer would",
    )
    how.add_argument(
        "--source",
        type=parse_source_arg,
        metavar="ADDR:PORT",
        help="--proxy-header: the client it names (default this socket's own address)",
    )
    check = parser.add_argument_group("measure")
    check.add_argument("--check", action="store_true", help="send random messages and verify")
    check.add_argument(
        "--service",
        choices=["discard", "chargen", "info"],
        help="measure a discard, chargen or info service instead of echo",
    )
    check.add_argument(
        "--count",
        type=int,
        metavar="N",
        help=f"messages per connection (default {DEFAULT_COUNT}; without end under --duration)",
    )
    check.add_argument(
        "--size",
        type=parse_size_range,
        metavar="N|MIN-MAX",
        help="message size in bytes, or a range to draw each size from (default 1KiB)",
    )
    check.add_argument(
        "--mode",
        choices=["ping-pong", "pipelined"],
        help="ping-pong: wait for each echo before the next message; pipelined: keep up to"
        " --window bytes in flight (default ping-pong)",
    )
    check.add_argument(
        "--window",
        type=parse_size,
        metavar="BYTES",
        help="pipelined: bytes sent but not yet echoed, per connection"
        f" (default {DEFAULT_WINDOW // 1024}KiB)",
    )
    check.add_argument(
        "--connections", type=int, metavar="N", help="concurrent connections (default 1)"
    )
    pace = check.add_mutually_exclusive_group()
    pace.add_argument(
        "--rate",
        type=parse_positive,
        metavar="N",
        help="messages per second per connection at most (--udp default 1000)",
    )
    pace.add_argument(
        "--interval", type=parse_positive, metavar="SECONDS", help="seconds between messages"
    )
    check.add_argument(
        "--duration",
        type=parse_positive,
        metavar="SECONDS",
        help="start no message after this long (with --count: whichever comes first)",
    )
    check.add_argument(
        "--seed", type=int, metavar="N", help="random seed, to send the same bytes again"
    )
    check.add_argument(
        "--json", action="store_true", help="print one JSON object: figures and exit status"
    )
    return parser


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, Target]:
    """Parse and cross-check the command line; exit 2 with a usage message if wrong."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.unix and (args.host is not None or args.port is not None):
        parser.error("--unix excludes --host and --port")
    if args.port is not None and not 0 < args.port < 65536:
        parser.error(f"--port must be 1-65535, got {args.port}")
    if args.timeout < 0:
        parser.error("--timeout must not be negative")
    measuring = args.check or args.udp or args.service is not None
    if not measuring:
        given = [
            f"--{name}" for name in _MEASURE_OPTIONS if getattr(args, name) not in (None, False)
        ]
        if given:
            parser.error(f"{', '.join(given)} only make sense with --check, --udp or --service")
    if (args.mode is not None or args.window is not None) and not args.check:
        parser.error("--mode and --window only make sense with --check")
    if args.check and args.service is not None:
        parser.error("--check measures echo: it excludes --service")
    for name in ("count", "connections"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.window is not None and args.mode != "pipelined":
        parser.error("--window only applies to --mode pipelined")
    given_tls = [f"--{name}" for name in _TLS_OPTIONS if getattr(args, name) not in (None, False)]
    if given_tls and not args.tls:
        parser.error(f"{', '.join(given_tls)} only make sense with --tls")
    if args.key and not args.cert:
        parser.error("--key needs --cert")
    if args.insecure and args.ca:
        parser.error("--insecure excludes --ca: nothing is verified")
    if args.source is not None and args.proxy_header is None:
        parser.error("--source only makes sense with --proxy-header")
    if args.unix and (args.ipv4 or args.ipv6 or args.tos is not None):
        parser.error("--unix excludes -4, -6 and --tos")
    if args.udp:
        for name in ("unix", "tls", "proxy_header", "mode"):
            if getattr(args, name):
                parser.error(f"--udp excludes --{name.replace('_', '-')}")
        if args.service == "chargen":
            parser.error("--udp --service chargen: UDP chargen is an amplifier; not served")
    args.size_given = args.size is not None
    args.size = args.size or (1024, 1024)
    if args.udp and args.service is None and args.size[0] < HEADER.size:
        parser.error(f"--udp datagrams carry a {HEADER.size}-byte header: --size {HEADER.size}+")
    if args.count is None and args.duration is None:
        args.count = DEFAULT_COUNT
    args.mode = args.mode or "ping-pong"
    args.window = args.window or DEFAULT_WINDOW
    args.connections = args.connections or 1
    args.timeout = args.timeout or None  # 0: no limit
    if args.rate is not None:
        args.interval = 1 / args.rate
    if args.unix:
        target = Target(unix_path=args.unix)
    else:
        target = Target(host=args.host or "127.0.0.1", port=args.port or 7080)
    return args, target


def connect_options(args: argparse.Namespace) -> Options:
    """The Options the command line asks for (TLS files are read here)."""
    family = socket.AF_INET if args.ipv4 else socket.AF_INET6 if args.ipv6 else socket.AF_UNSPEC
    context = None
    if args.tls:
        context = tls_context(args.ca, args.cert, args.key, args.insecure)
    return Options(
        family=family,
        tos=args.tos,
        proxy_header=args.proxy_header,
        proxy_source=args.source,
        tls=context,
        server_hostname=args.sni,
    )


def measure(args: argparse.Namespace, target: Target, options: Options) -> Report:
    """Run the measuring mode the command line names."""
    if args.service == "discard":
        return run_discard(args, target, options)
    if args.service == "chargen":
        return run_chargen(args, target, options)
    if args.service == "info":
        return run_info(args, target, options)
    if args.udp:
        return run_udp(args, target, options)
    return run_check(args, target, options)


def _mode_name(args: argparse.Namespace) -> str:
    return str(args.service or ("udp" if args.udp else "echo"))


def main(argv: list[str] | None = None) -> int:
    """Run epolld-client and return its exit code; see EPILOG for the codes."""
    args, target = parse_args(argv)
    measuring = args.check or args.udp or args.service is not None
    try:
        options = connect_options(args)
        if not measuring:
            run_interactive(target, args.timeout, options)
            return EXIT_OK
        report = measure(args, target, options)
        if args.json:
            print(to_json(report, report.exit_code, report.problem))
        else:
            print("\n".join(report.lines))
        if report.problem:
            print(f"Error: {report.problem}", file=sys.stderr)
        return report.exit_code
    except ClientError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        if args.json:
            print(to_json(Report(_mode_name(args), str(target)), exc.exit_code, str(exc)))
        return exc.exit_code
    except KeyboardInterrupt:
        print("\nInterrupted", file=sys.stderr)
        if args.json:
            print(to_json(None, EXIT_INTERRUPTED, "interrupted"))
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # stdout went away (| head): not the server's fault
        # Point stdout at /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
