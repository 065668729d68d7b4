"""epolld-client: talk to any echo server by hand, or check one end to end.

Interactive mode keeps the spirit of the epoll teaching example epolld grew
from: it prompts "Input Something:", sends the line and prints "Receive: ..."
with the echo. With stdin piped it prints only the echoes, so
``printf 'a\\nb\\n' | epolld-client`` prints ``a`` and ``b``.

``--check`` is what an operator runs after a deploy or from monitoring: it
sends random messages, verifies every echoed byte, reports latency and
throughput, and exits 0 only if every byte came back intact.

All socket I/O goes through one small poll() engine (_Connection and _run) that
sends while it reads: a blocking send-then-receive deadlocks as soon as a
message is larger than the two socket buffers together, because the server
stops reading once it cannot write the echo back.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import math
import os
import random
import re
import select
import socket
import sys
import time
from collections.abc import Iterator, Sequence

from epolld import __version__

RECV_SIZE = 256 * 1024  # bytes per recv()
STDIN_LINE_MAX = 64 * 1024  # bytes per interactive send; longer lines go in pieces
DEFAULT_WINDOW = 256 * 1024  # bytes in flight per connection in pipelined mode
DEFAULT_TIMEOUT_S = 10.0
POOL_SIZE = 1024 * 1024  # bytes of seeded random data that --check messages are cut from
BLOCK_SIZE = 64 * 1024  # bytes of a message taken from one random offset in the pool
HEX_SHOWN = 16  # bytes of expected and received data shown in a mismatch report

_SIZE_UNITS = {"": 1, "b": 1, "kib": 1024, "mib": 1024**2, "gib": 1024**3}
_AMBIGUOUS_UNITS = {"k": "KiB", "kb": "KiB", "m": "MiB", "mb": "MiB", "g": "GiB", "gb": "GiB"}

# Exit codes: sysexits(3) names, as epolld's own errors use, so that monitoring
# can tell "the server is down" from "the server is wrong".
EXIT_OK = 0
EXIT_USAGE = 2  # argparse's own code
EXIT_MISMATCH = os.EX_DATAERR  # 65
EXIT_RESOLVE = os.EX_NOHOST  # 68
EXIT_REFUSED = os.EX_UNAVAILABLE  # 69
EXIT_SOCKET = os.EX_OSERR  # 71
EXIT_RESET = os.EX_IOERR  # 74
EXIT_TIMEOUT = os.EX_TEMPFAIL  # 75
EXIT_CLOSED_EARLY = os.EX_PROTOCOL  # 76
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it

EPILOG = f"""\
modes:
  interactive (default)  prompt "Input Something:", send the line, print "Receive: <echo>";
                         with stdin not a terminal, print only the echoes. Ctrl-D ends.
  --check                send --count random messages per connection, verify every echoed
                         byte, print latency and throughput.

sizes: bytes (64, 64B), KiB, MiB or GiB (1024-based; KB and MB are refused as ambiguous,
as in epolld's config); --size MIN-MAX draws each message's size from that range.

exit codes:
  {EXIT_OK}   success: every byte came back intact (or stdin ended)
  {EXIT_USAGE}   bad command line
  {EXIT_MISMATCH}  the echo differs from what was sent (the report names the byte offset)
  {EXIT_RESOLVE}  the host name could not be resolved
  {EXIT_REFUSED}  connection refused, or no socket at the --unix path
  {EXIT_SOCKET}  any other socket error (unreachable network, permission denied, ...)
  {EXIT_RESET}  connection reset by the server
  {EXIT_TIMEOUT}  timed out (--timeout) connecting or waiting for the echo
  {EXIT_CLOSED_EARLY}  the server closed the connection before the whole echo came back
  {EXIT_INTERRUPTED} interrupted (Ctrl-C)
"""


class ClientError(Exception):
    """A failure to report as one line on stderr with its own exit code."""

    exit_code = EXIT_SOCKET


class ResolveFailed(ClientError):
    """The host name did not resolve to an address."""

    exit_code = EXIT_RESOLVE


class Refused(ClientError):
    """Nothing accepts connections at the address."""

    exit_code = EXIT_REFUSED


class Reset(ClientError):
    """The server reset the connection."""

    exit_code = EXIT_RESET


class TimedOut(ClientError):
    """Connecting, or waiting for the echo, took longer than --timeout."""

    exit_code = EXIT_TIMEOUT


class ClosedEarly(ClientError):
    """The server closed the connection before echoing everything sent."""

    exit_code = EXIT_CLOSED_EARLY


class Mismatch(ClientError):
    """The echo differs from what was sent."""

    exit_code = EXIT_MISMATCH


@dataclasses.dataclass(frozen=True, slots=True)
class Target:
    """Where to connect: a TCP host and port, or a Unix stream socket path."""

    host: str = ""
    port: int = 0
    unix_path: str = ""

    def __str__(self) -> str:
        if self.unix_path:
            return f"unix:{self.unix_path}"
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def connect(target: Target, timeout: float | None) -> socket.socket:
    """Open a non-blocking stream connection to target.

    Args:
        target: the TCP address or Unix socket path.
        timeout: seconds to wait for each connection attempt; None waits forever.

    Raises:
        ResolveFailed, Refused, TimedOut, ClientError: with a one-line reason.
    """
    candidates: list[tuple[int, str | tuple[object, ...]]]
    if target.unix_path:
        candidates = [(socket.AF_UNIX, target.unix_path)]
    else:
        try:
            infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ResolveFailed(f"cannot resolve host {target.host!r}: {exc.strerror}") from None
        except UnicodeError as exc:  # the idna codec rejects, e.g., a label over 63 chars
            raise ResolveFailed(f"cannot resolve host {target.host!r}: {exc}") from None
        candidates = [(family, sockaddr) for family, _, _, _, sockaddr in infos]
    error: OSError | None = None
    for family, address in candidates:  # like socket.create_connection: first one that works
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        sock.setblocking(False)
        if family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small echoes at once
        return sock
    assert error is not None  # getaddrinfo never returns an empty list
    raise _connect_error(error, target, timeout)


def _connect_error(exc: OSError, target: Target, timeout: float | None) -> ClientError:
    """Turn a failed connect() into the ClientError that names its cause."""
    if isinstance(exc, ConnectionRefusedError):
        return Refused(f"connection refused by {target} (is the server running?)")
    if isinstance(exc, FileNotFoundError) and target.unix_path:
        return Refused(f"no socket at {target.unix_path} (is the server running?)")
    if isinstance(exc, TimeoutError):
        return TimedOut(f"timed out after {timeout:g} s connecting to {target}")
    return ClientError(f"cannot connect to {target}: {exc.strerror or exc}")


@dataclasses.dataclass(slots=True)
class _Message:
    """One message in flight: what was sent, and how much of it came back."""

    number: int  # 1-based, per connection
    data: bytes
    stream_offset: int  # offset of data[0] in everything sent on the connection
    echo: bytearray | None  # collects the echo instead of verifying it (interactive mode)
    sent: int = 0
    received: int = 0
    started_at: float = 0.0  # first byte handed to send()
    sent_at: float = 0.0  # last byte handed to send()


class _Connection:
    """One connection: sends messages, reads their echo back and verifies or collects it.

    Ping-pong (window None) starts a message only once the previous echo is
    complete; pipelined keeps at most window bytes sent but not yet echoed.
    Either way it reads whenever the server writes, so neither side can block
    the other on full buffers.
    """

    def __init__(self, sock: socket.socket, label: str, window: int | None) -> None:
        self.sock = sock
        self.label = label
        self.window = window
        self.inflight: collections.deque[_Message] = collections.deque()
        self.completed: list[_Message] = []  # only when collecting echoes
        self.latencies: list[float] = []  # seconds, one per verified message
        self.bytes_sent = 0
        self.bytes_received = 0
        self.messages_done = 0
        self.count: int | None = None  # total messages, when known, for reports
        self._source: Iterator[bytes] = iter(())
        self._next: bytes | None = None
        self._collect = False
        self._numbered = 0

    def __repr__(self) -> str:
        return (
            f"<_Connection {self.label} sent={self.bytes_sent} received={self.bytes_received}"
            f" inflight={len(self.inflight)}>"
        )

    def feed(self, messages: Iterator[bytes], *, collect: bool = False) -> None:
        """Queue messages to send; with collect, keep their echo instead of verifying it."""
        self._source = messages
        self._next = next(self._source, None)
        self._collect = collect

    @property
    def done(self) -> bool:
        """True once every queued message was sent and fully echoed."""
        return self._next is None and not self.inflight

    def wants_write(self) -> bool:
        """True if there are bytes to send now without exceeding the window."""
        return self._send_budget() > 0

    def _send_budget(self) -> int:
        """Bytes to send now: the rest of the current message, else the next one if allowed."""
        current = self.inflight[-1] if self.inflight else None
        if current is not None and current.sent < len(current.data):
            unsent = len(current.data) - current.sent
        elif self._next is not None and (self.window is not None or current is None):
            unsent = len(self._next)  # ping-pong starts it only once every echo is complete
        else:
            return 0
        if self.window is None:
            return unsent
        return min(unsent, self.window - (self.bytes_sent - self.bytes_received))

    def on_writable(self) -> bool:
        """Send what the window allows; return True if any byte went out."""
        budget = self._send_budget()
        if budget <= 0:
            return False
        message = self.inflight[-1] if self.inflight else None
        if message is None or message.sent == len(message.data):
            assert self._next is not None
            self._numbered += 1
            message = _Message(
                self._numbered,
                self._next,
                self.bytes_sent,
                bytearray() if self._collect else None,
            )
            self.inflight.append(message)
            self._next = next(self._source, None)
        end = message.sent + budget
        if message.sent == 0:
            message.started_at = time.perf_counter()
        try:
            sent = self.sock.send(memoryview(message.data)[message.sent : end])
        except BlockingIOError:
            return False
        except OSError as exc:
            raise self._io_error(exc) from None
        message.sent += sent
        self.bytes_sent += sent
        if message.sent == len(message.data):
            message.sent_at = time.perf_counter()
        return sent > 0

    def on_readable(self) -> bool:
        """Receive and check the echo; return True if any byte came in.

        Raises:
            ClosedEarly, Reset, Mismatch, ClientError: the echo cannot complete.
        """
        try:
            data = self.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return False
        except OSError as exc:
            raise self._io_error(exc) from None
        if not data:  # only called while an echo is due, so EOF is always early
            raise ClosedEarly(
                f"{self.label} closed the connection after echoing {self.bytes_received}"
                f" of the {self.bytes_sent} bytes sent{self._pending_note()}"
            )
        if self.bytes_received + len(data) > self.bytes_sent:
            raise Mismatch(
                f"{self.label} sent {self.bytes_received + len(data) - self.bytes_sent}"
                f" more bytes than it was sent (stream offset {self.bytes_sent})"
            )
        now = time.perf_counter()
        position = 0
        while position < len(data):
            message = self.inflight[0]
            take = min(len(message.data) - message.received, len(data) - position)
            # Slicing bytes copies, but then compares with memcmp: 100x faster than
            # comparing memoryviews, which CPython does element by element.
            chunk = data[position : position + take] if take < len(data) else data
            if message.echo is not None:
                message.echo += chunk
            elif chunk != message.data[message.received : message.received + take]:
                raise self._mismatch(message, data, position)
            message.received += take
            self.bytes_received += take
            position += take
            if message.received == len(message.data):
                self.inflight.popleft()
                self.messages_done += 1
                if message.echo is not None:
                    self.completed.append(message)
                else:  # pipelined: from the last byte sent; ping-pong: from the first
                    since = message.started_at if self.window is None else message.sent_at
                    self.latencies.append(now - since)
        return True

    def _pending_note(self) -> str:
        if self.count is None:
            return ""
        return f" ({self.messages_done} of {self.count} messages complete)"

    def _mismatch(self, message: _Message, data: bytes, position: int) -> Mismatch:
        """Describe where data, received from position on, first differs from message."""
        in_message = message.received
        while data[position] == message.data[in_message]:
            position += 1
            in_message += 1
        want = message.data[in_message : in_message + HEX_SHOWN]
        have = data[position : position + HEX_SHOWN]
        of_count = f" of {self.count}" if self.count is not None else ""
        return Mismatch(
            f"echo diverged on {self.label} at stream offset {message.stream_offset + in_message}"
            f" (message {message.number}{of_count}, offset {in_message} of {len(message.data)}"
            f" bytes)\n  expected: {want.hex(' ')}\n  got:      {have.hex(' ')}"
        )

    def _io_error(self, exc: OSError) -> ClientError:
        progress = f"after {self.bytes_received} of {self.bytes_sent} bytes echoed"
        if isinstance(exc, ConnectionResetError | BrokenPipeError | ConnectionAbortedError):
            return Reset(f"connection reset by {self.label} {progress}")
        if isinstance(exc, TimeoutError):  # ETIMEDOUT from the kernel's retransmission limit
            return TimedOut(f"{self.label} stopped acknowledging data {progress}")
        return ClientError(f"{self.label}: {exc.strerror or exc} {progress}")


def _run(connections: Sequence[_Connection], timeout: float | None) -> None:
    """Drive connections until each is done.

    Args:
        connections: non-blocking connections with messages fed.
        timeout: seconds a connection may wait without sending or receiving a byte.

    Raises:
        TimedOut: a connection made no progress for timeout seconds.
        ClientError: a connection failed; see _Connection.on_readable().
    """
    poller = select.poll()
    by_fd = {c.sock.fileno(): c for c in connections}
    masks: dict[int, int] = {}
    now = time.monotonic()
    deadlines = {fd: now + (timeout or 0.0) for fd in by_fd}
    try:
        while True:
            for fd, connection in by_fd.items():
                mask = 0
                if not connection.done:  # POLLIN always: notice EOF and resets at once
                    mask = select.POLLIN | (select.POLLOUT if connection.wants_write() else 0)
                if mask == masks.get(fd, 0):
                    continue
                if fd not in masks:
                    poller.register(fd, mask)
                elif mask:
                    poller.modify(fd, mask)
                else:
                    poller.unregister(fd)
                    del masks[fd]
                    continue
                masks[fd] = mask
            if not masks:
                return
            wait_ms = None
            if timeout:  # poll() takes milliseconds: round up, or it wakes just too early
                wait_ms = max(0, math.ceil((min(deadlines[fd] for fd in masks) - now) * 1000))
            events = poller.poll(wait_ms)
            now = time.monotonic()
            for fd, event in events:
                connection = by_fd[fd]
                progressed = False
                if event & (select.POLLIN | select.POLLERR | select.POLLHUP):
                    progressed = connection.on_readable()  # first, so EOF beats EPIPE
                if event & select.POLLOUT:
                    progressed = connection.on_writable() or progressed
                if progressed:
                    deadlines[fd] = now + (timeout or 0.0)
            for fd in masks:
                if timeout and now >= deadlines[fd]:
                    c = by_fd[fd]
                    raise TimedOut(
                        f"timed out after {timeout:g} s waiting for {c.label}"
                        f" ({c.bytes_received} of {c.bytes_sent} bytes echoed)"
                    )
    finally:
        for fd in masks:
            poller.unregister(fd)


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


def random_pool(seed: int) -> memoryview:
    """Return POOL_SIZE seeded random bytes, twice over so a slice may wrap around."""
    pool = random.Random(seed).randbytes(POOL_SIZE)
    return memoryview(pool + pool)


def random_messages(
    pool: memoryview, seed: int, connection: int, count: int, size: tuple[int, int]
) -> Iterator[bytes]:
    """Yield count random messages; the same seed and connection give the same bytes.

    random.randbytes() makes only about 200 MB/s here, slower than the servers
    under test, so messages are cut from the random pool instead: each block of
    BLOCK_SIZE bytes starts at its own random offset. A dropped, repeated or
    reordered block therefore still shows up as a mismatch.

    Args:
        pool: random_pool(seed).
        seed: the --seed value.
        connection: 1-based connection number; each connection gets its own messages.
        count: messages to yield.
        size: (min, max) bytes per message, inclusive.
    """
    rng = random.Random(f"{seed}/{connection}")
    for _ in range(count):
        length = rng.randint(*size)
        blocks = []
        for start in range(0, length, BLOCK_SIZE):
            offset = rng.randrange(POOL_SIZE)
            blocks.append(pool[offset : offset + min(BLOCK_SIZE, length - start)])
        yield b"".join(blocks)


def _percentile(ordered: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending sequence."""
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def _format_size(size: tuple[int, int]) -> str:
    return f"{size[0]} B" if size[0] == size[1] else f"{size[0]}-{size[1]} B"


def run_check(args: argparse.Namespace, target: Target) -> int:
    """Send random messages on each connection, verify the echo and print the figures.

    Raises:
        ClientError: a connection failed or the echo differs; nothing is printed then.
    """
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    window = args.window if args.mode == "pipelined" else None
    pool = random_pool(seed)
    connections: list[_Connection] = []
    try:
        for number in range(1, args.connections + 1):
            label = str(target) if args.connections == 1 else f"{target} (connection {number})"
            connection = _Connection(connect(target, args.timeout), label, window)
            connections.append(connection)
            connection.feed(random_messages(pool, seed, number, args.count, args.size))
            connection.count = args.count
        started = time.perf_counter()
        try:
            _run(connections, args.timeout)
        except Mismatch as exc:
            raise Mismatch(f"{exc}\n  (--seed {seed} sends the same messages again)") from None
        elapsed = time.perf_counter() - started
        for connection in connections:  # a clean end: the server sees EOF, not a reset
            with contextlib.suppress(OSError):
                connection.sock.shutdown(socket.SHUT_WR)
    finally:
        for connection in connections:
            connection.sock.close()
    latencies = sorted(t for c in connections for t in c.latencies)
    total_bytes = sum(c.bytes_received for c in connections)
    messages = len(latencies)
    rate = 1 / elapsed if elapsed > 0 else math.inf
    what = "first byte sent" if window is None else "last byte sent"
    plural = "s" if args.connections != 1 else ""
    print(
        f"check passed: {messages} messages, {total_bytes} bytes echoed intact by {target}"
        f" over {args.connections} connection{plural}"
    )
    print(f"mode {args.mode}, sizes {_format_size(args.size)}, seed {seed}")
    print(
        f"latency ({what} to last byte echoed): p50 {_percentile(latencies, 0.50) * 1e3:.3f} ms,"
        f" p99 {_percentile(latencies, 0.99) * 1e3:.3f} ms, max {latencies[-1] * 1e3:.3f} ms"
    )
    print(
        f"throughput: {total_bytes * rate / 1e6:.2f} MB/s echoed (MB = 10^6 bytes),"
        f" {messages * rate:.0f} messages/s, in {elapsed:.3f} s"
    )
    return EXIT_OK


def run_interactive(target: Target, timeout: float | None) -> int:
    """Echo stdin lines through the server: prompted on a terminal, plain when piped.

    Raises:
        ClientError: the connection failed.
    """
    terminal = sys.stdin.isatty()
    with connect(target, timeout) as sock:
        connection = _Connection(sock, str(target), window=None)
        if terminal:
            print(f"Connected to {target}. Ctrl-D ends.", file=sys.stderr)
        while True:
            if terminal:
                try:
                    line = input("Input Something: ")
                except EOFError:
                    print(file=sys.stderr)  # end the prompt's line
                    break
                data = (line + "\n").encode()
            else:
                data = sys.stdin.buffer.readline(STDIN_LINE_MAX)
                if not data:
                    break
            connection.feed(iter([data]), collect=True)
            _run([connection], timeout)
            echo = bytes(connection.completed.pop().echo or b"")
            if terminal:
                print(f"Receive: {echo.decode(errors='replace').removesuffix(chr(10))}")
            else:
                sys.stdout.buffer.write(echo)
                sys.stdout.buffer.flush()
        with contextlib.suppress(OSError):  # Ctrl-D: tell the server we are done
            sock.shutdown(socket.SHUT_WR)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """Return the argparse parser for epolld-client."""
    parser = argparse.ArgumentParser(
        prog="epolld-client",
        description="Talk to an echo server interactively, or --check that it echoes intact.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    where = parser.add_argument_group("where")
    where.add_argument("--host", help="host name or address (default 127.0.0.1)")
    where.add_argument("--port", type=int, help="TCP port (default 7080)")
    where.add_argument("--unix", metavar="PATH", help="connect to a Unix stream socket instead")
    where.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"limit for connecting and for each wait for the server; 0 waits forever"
        f" (default {DEFAULT_TIMEOUT_S:g})",
    )
    check = parser.add_argument_group("check")
    check.add_argument("--check", action="store_true", help="send random messages and verify")
    check.add_argument(
        "--count", type=int, metavar="N", help="messages per connection (default 100)"
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
    check.add_argument(
        "--seed", type=int, metavar="N", help="random seed, to send the same bytes again"
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
    check_only = ("count", "size", "mode", "window", "connections", "seed")
    if not args.check:
        given = [f"--{name}" for name in check_only if getattr(args, name) is not None]
        if given:
            parser.error(f"{', '.join(given)} only make sense with --check")
    for name in ("count", "connections"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.window is not None and args.mode != "pipelined":
        parser.error("--window only applies to --mode pipelined")
    args.count = args.count or 100
    args.size = args.size or (1024, 1024)
    args.mode = args.mode or "ping-pong"
    args.window = args.window or DEFAULT_WINDOW
    args.connections = args.connections or 1
    args.timeout = args.timeout or None  # 0: no limit
    if args.unix:
        target = Target(unix_path=args.unix)
    else:
        target = Target(host=args.host or "127.0.0.1", port=args.port or 7080)
    return args, target


def main(argv: list[str] | None = None) -> int:
    """Run epolld-client and return its exit code; see EPILOG for the codes."""
    args, target = parse_args(argv)
    try:
        if args.check:
            return run_check(args, target)
        return run_interactive(target, args.timeout)
    except ClientError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("\nInterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # stdout went away (| head): not the server's fault
        # Point stdout at /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
