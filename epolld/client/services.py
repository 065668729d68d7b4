"""--service discard|chargen|info: the other services a listener may run.

- discard (RFC 863): bytes go one way; the figure is the throughput until the
  server's FIN answers ours (so every byte was read), and a single byte back fails.
- chargen (RFC 864): lines of 72 printable characters then CR LF, each line starting
  one character further round the 95 printable ASCII characters; every byte read is
  checked against that pattern, from wherever the server starts it.
- info: one line of JSON describing what the server saw, then FIN; printed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import select
import socket
import ssl
import time
from typing import Any

from epolld.client.connect import Options, Target, connect, open_datagram
from epolld.client.engine import io_error, next_start
from epolld.client.errors import ClosedEarly, Mismatch, Refused, TimedOut
from epolld.client.payload import random_messages, random_pool
from epolld.client.report import Report, rate
from epolld.client.udp import DEFAULT_RATE

PRINTABLE = bytes(range(32, 127))  # the 95 printable ASCII characters, space first
LINE_CHARS = 72
LINE = LINE_CHARS + 2  # with CR LF
CYCLE = b"".join(
    (PRINTABLE * 2)[start : start + LINE_CHARS] + b"\r\n" for start in range(len(PRINTABLE))
)  # 95 lines: after them the pattern repeats
INFO_MAX = 64 * 1024  # bytes of info reply read at most
UDP_INFO_REQUEST = 512  # the reply is never longer than the request: pad to its maximum
RECV_SIZE = 256 * 1024


def _volume(args: argparse.Namespace) -> int | None:
    """Bytes to move: --count messages of --size (the upper size), or None under --duration."""
    if args.count is None and args.duration is not None:
        return None
    return int((args.count or 100) * args.size[1])


def _blocking(target: Target, args: argparse.Namespace, options: Options) -> socket.socket:
    sock = connect(target, args.timeout, options)
    sock.settimeout(args.timeout)
    return sock


def _io(call: Any, target: Target, what: str) -> Any:
    """Run one blocking socket call; a failure becomes the ClientError naming what was awaited."""
    try:
        return call()
    except TimeoutError:
        raise TimedOut(f"timed out waiting for {target} ({what})") from None
    except OSError as exc:
        raise io_error(exc, str(target), f"(waiting for {what})") from None


def run_discard(args: argparse.Namespace, target: Target, options: Options) -> Report:
    """Send --count messages (or for --duration) to a discard server, at --rate if asked.

    Raises:
        Mismatch: the server sent a byte back.
        ClientError: the connection failed.
    """
    if args.udp:
        return _discard_udp(args, target, options)
    seed = args.seed if args.seed is not None else 0
    count = args.count if args.count is not None or args.duration is None else None
    messages = random_messages(random_pool(seed), seed, 1, count, args.size)
    sock = _blocking(target, args, options)
    sent = 0
    with sock:
        started = time.monotonic()
        stop_at = started + args.duration if args.duration is not None else None
        scheduled = None
        for message in messages:
            now = time.monotonic()
            if stop_at is not None and now >= stop_at:
                break
            if args.interval is not None:
                if scheduled is not None and scheduled > now:
                    time.sleep(scheduled - now)
                scheduled = next_start(scheduled, time.monotonic(), args.interval)
            _io(lambda m=message: sock.sendall(m), target, "to take more bytes")
            sent += len(message)
        back = _end_and_read(sock, target)
        elapsed = time.monotonic() - started
    if back:
        raise Mismatch(f"discard server {target} sent {len(back)} bytes back: {back[:16]!r}")
    report = Report("discard", str(target))
    report.lines = [
        f"discard: {sent} bytes sent to {target} and read by it (its FIN answered ours)",
        f"throughput: {rate(sent, elapsed) / 1e6:.2f} MB/s one way (MB = 10^6 bytes),"
        f" in {elapsed:.3f} s",
    ]
    report.figures = {
        "transport": "tls" if options.tls is not None else "stream",
        "bytes_sent": sent,
        "elapsed_s": elapsed,
        "throughput_bytes_per_s": rate(sent, elapsed),
    }
    return report


def _end_and_read(sock: socket.socket, target: Target) -> bytes:
    """Send our end (TLS close_notify, FIN) and read until the server's FIN: what came back."""
    if isinstance(sock, ssl.SSLSocket):
        try:  # close_notify both ways: the server has read every byte before its own
            sock = _io(sock.unwrap, target, "its close_notify")
        except ssl.SSLError as exc:  # e.g. application data where close_notify was due
            raise Mismatch(f"discard server {target} did not close cleanly: {exc}") from None
    sock.shutdown(socket.SHUT_WR)
    back = b""
    while chunk := _io(lambda: sock.recv(RECV_SIZE), target, "its FIN"):
        back += chunk
    return back


def _discard_udp(args: argparse.Namespace, target: Target, options: Options) -> Report:
    """Send datagrams to a UDP discard server (at --rate, default the --udp one); any reply
    within half a second fails."""
    count = args.count if args.count is not None or args.duration is None else None
    sock = open_datagram(target, options)
    sock.setblocking(True)
    seed = args.seed if args.seed is not None else 0
    sent = datagrams = 0
    with sock:
        started = time.monotonic()
        stop_at = started + args.duration if args.duration is not None else None
        scheduled = None
        interval = args.interval if args.interval is not None else 1 / DEFAULT_RATE
        for message in random_messages(random_pool(seed), seed, 1, count, args.size):
            now = time.monotonic()
            if stop_at is not None and now >= stop_at:
                break
            if scheduled is not None and scheduled > now:
                time.sleep(scheduled - now)
            scheduled = next_start(scheduled, time.monotonic(), interval)
            try:
                sock.send(message)
            except ConnectionRefusedError:
                raise Refused(f"nothing listens on UDP {target} (ICMP port unreachable)") from None
            sent += len(message)
            datagrams += 1
        elapsed = time.monotonic() - started
        readable, _, _ = select.select([sock], [], [], 0.5)
        if readable:
            raise Mismatch(f"discard server {target} answered a datagram")
    report = Report("discard", f"udp:{target}")
    report.lines = [
        f"discard: {datagrams} datagrams ({sent} bytes) sent to udp:{target}, none answered",
        f"{rate(datagrams, elapsed):.0f} datagrams/s, {rate(sent, elapsed) / 1e6:.2f} MB/s"
        f" in {elapsed:.3f} s",
    ]
    report.figures = {
        "transport": "udp",
        "datagrams_sent": datagrams,
        "bytes_sent": sent,
        "elapsed_s": elapsed,
        "throughput_bytes_per_s": rate(sent, elapsed),
    }
    return report


class ChargenChecker:
    """Checks a chargen stream against RFC 864's pattern, chunk by chunk."""

    def __init__(self) -> None:
        self.received = 0
        self._phase: int | None = None  # offset in CYCLE of the next byte

    def feed(self, data: bytes) -> None:
        """Check data, the next bytes of the stream.

        Raises:
            Mismatch: naming the first byte off the pattern.
        """
        if not data:
            return
        if self._phase is None:
            if data[0] not in PRINTABLE:
                raise Mismatch(f"chargen stream starts with {data[:16]!r}, not a printable line")
            self._phase = PRINTABLE.index(data[0]) * LINE
        phase = self._phase
        repeats = (phase + len(data)) // len(CYCLE) + 1
        expected = (CYCLE * (repeats + 1))[phase : phase + len(data)]
        if data != expected:
            at = next(i for i in range(len(data)) if data[i] != expected[i])
            offset = self.received + at
            raise Mismatch(
                f"chargen pattern broken at stream offset {offset} (line {offset // LINE + 1},"
                f" column {offset % LINE + 1}): expected {expected[at : at + 16]!r},"
                f" got {data[at : at + 16]!r}"
            )
        self.received += len(data)
        self._phase = (phase + len(data)) % len(CYCLE)


def run_chargen(args: argparse.Namespace, target: Target, options: Options) -> Report:
    """Read --count x --size bytes (or for --duration) of chargen and check each.

    Raises:
        Mismatch: a byte off the pattern.
        ClosedEarly: the server closed before the bytes wanted came.
    """
    wanted = _volume(args)
    checker = ChargenChecker()
    sock = _blocking(target, args, options)
    with sock:
        started = time.monotonic()
        stop_at = started + args.duration if args.duration is not None else None
        while wanted is None or checker.received < wanted:
            if stop_at is not None:
                left = stop_at - time.monotonic()
                if left <= 0:
                    break
                sock.settimeout(min(left, args.timeout) if args.timeout else left)
            want = RECV_SIZE if wanted is None else min(RECV_SIZE, wanted - checker.received)
            try:
                data = sock.recv(want)
            except TimeoutError:
                if stop_at is not None and time.monotonic() >= stop_at:
                    break
                raise TimedOut(
                    f"timed out waiting for chargen from {target} ({checker.received} bytes so far)"
                ) from None
            except OSError as exc:
                raise io_error(exc, str(target), f"after {checker.received} bytes") from None
            if not data:
                raise ClosedEarly(
                    f"{target} closed the chargen stream after {checker.received} bytes"
                )
            checker.feed(data)
        elapsed = time.monotonic() - started
    received = checker.received
    report = Report("chargen", str(target))
    report.lines = [
        f"chargen: {received} bytes ({received // LINE} lines) from {target} follow"
        " RFC 864's pattern",
        f"throughput: {rate(received, elapsed) / 1e6:.2f} MB/s (MB = 10^6 bytes),"
        f" in {elapsed:.3f} s",
    ]
    report.figures = {
        "transport": "tls" if options.tls is not None else "stream",
        "bytes_received": received,
        "lines": received // LINE,
        "elapsed_s": elapsed,
        "throughput_bytes_per_s": rate(received, elapsed),
    }
    return report


def run_info(args: argparse.Namespace, target: Target, options: Options) -> Report:
    """Read the one JSON line an info service sends (over UDP: ask with a padded datagram).

    Raises:
        Mismatch: the reply is not one JSON object on one line.
        TimedOut: no reply.
    """
    started = time.monotonic()
    if args.udp:
        reply = _info_udp(args, target, options)
    else:
        with _blocking(target, args, options) as sock:
            reply = b""
            while len(reply) <= INFO_MAX and (
                chunk := _io(lambda: sock.recv(RECV_SIZE), target, "its info line")
            ):
                reply += chunk
    elapsed = time.monotonic() - started
    text = reply.decode(errors="replace")
    try:
        seen = json.loads(reply)
    except ValueError:
        seen = None
    one_line = args.udp or (reply.endswith(b"\n") and reply.count(b"\n") == 1)
    if not isinstance(seen, dict) or not one_line:
        raise Mismatch(f"info from {target} is not one line of JSON: {text[:200]!r}")
    where = f"udp:{target}" if args.udp else str(target)
    report = Report("info", where)
    report.lines = [f"info: what {where} saw of this client:"]
    report.lines += [f"  {key}: {value}" for key, value in _flatten(seen)]
    report.figures = {
        "transport": "udp" if args.udp else "tls" if options.tls is not None else "stream",
        "info": seen,
        "bytes_received": len(reply),
        "elapsed_s": elapsed,
    }
    return report


def _info_udp(args: argparse.Namespace, target: Target, options: Options) -> bytes:
    size = max(UDP_INFO_REQUEST, args.size[1]) if args.size_given else UDP_INFO_REQUEST
    with open_datagram(target, options) as sock:
        try:
            sock.send(b"info\n".ljust(size, b" "))
            readable, _, _ = select.select([sock], [], [], args.timeout)
            if readable:
                with contextlib.suppress(BlockingIOError):
                    return sock.recv(65536)
        except ConnectionRefusedError:
            raise Refused(f"nothing listens on UDP {target} (ICMP port unreachable)") from None
    raise TimedOut(f"no info reply from udp:{target} to a {size}-byte request")


def _flatten(value: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested keys as dotted names, for the text report."""
    items: list[tuple[str, Any]] = []
    for key, item in value.items():
        if isinstance(item, dict):
            items += _flatten(item, f"{prefix}{key}.")
        else:
            items.append((prefix + key, item))
    return items
