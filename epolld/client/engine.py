"""The poll() engine every stream mode shares: it sends while it reads.

A blocking send-then-receive deadlocks as soon as a message is larger than the
two socket buffers together, because the server stops reading once it cannot
write the echo back. Connection sends messages (paced by --rate when asked) and
verifies or collects their echo; run() drives a set of them.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import select
import socket
import ssl
import time
from collections.abc import Iterator, Sequence

from epolld.client.errors import (
    ClientError,
    ClosedEarly,
    Mismatch,
    Reset,
    TimedOut,
    TlsFailed,
)

RECV_SIZE = 256 * 1024  # bytes per recv()
TLS_SEND_MAX = 16 * 1024  # one TLS record: a retried SSL_write never shrinks below it
HEX_SHOWN = 16  # bytes of expected and received data shown in a mismatch report
CATCH_UP = 10  # intervals a paced sender may fall behind its schedule and then catch up


def next_start(scheduled: float | None, now: float, interval: float) -> float:
    """When the message after one starting now may start, under --rate or --interval.

    A fixed schedule from the first start, so that poll()'s millisecond wake-ups do not
    slow the rate down; a sender stalled for longer catches up at most CATCH_UP
    messages back to back.
    """
    if scheduled is None:
        scheduled = now
    return max(scheduled, now - CATCH_UP * interval) + interval


def recv_some(sock: socket.socket) -> bytes | None:
    """What a non-blocking socket (TLS or not) holds now; None if nothing yet, b"" at EOF."""
    try:
        data = sock.recv(RECV_SIZE)
    except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
        return None
    if isinstance(sock, ssl.SSLSocket):  # poll() cannot see what OpenSSL already holds
        while data and sock.pending():
            data += sock.recv(sock.pending())
    return data


def send_some(sock: socket.socket, data: memoryview) -> int:
    """Send what the non-blocking socket takes now; 0 if nothing."""
    if isinstance(sock, ssl.SSLSocket):
        data = data[:TLS_SEND_MAX]
    try:
        return sock.send(data)
    except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
        return 0


def io_error(exc: OSError, label: str, progress: str) -> ClientError:
    """The ClientError for an OSError on label's connection."""
    if isinstance(exc, ssl.SSLError):  # e.g. TLS 1.3: the server refuses our certificate
        return TlsFailed(f"TLS error from {label} {progress}: {exc.reason or exc}")
    if isinstance(exc, ConnectionResetError | BrokenPipeError | ConnectionAbortedError):
        return Reset(f"connection reset by {label} {progress}")
    if isinstance(exc, TimeoutError):  # ETIMEDOUT from the kernel's retransmission limit
        return TimedOut(f"{label} stopped acknowledging data {progress}")
    return ClientError(f"{label}: {exc.strerror or exc} {progress}")


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


class Connection:
    """One connection: sends messages, reads their echo back and verifies or collects it.

    Ping-pong (window None) starts a message only once the previous echo is
    complete; pipelined keeps at most window bytes sent but not yet echoed.
    Either way it reads whenever the server writes, so neither side can block
    the other on full buffers. With an interval, messages start at most once per
    interval; with stop_at, none starts after that monotonic time.
    """

    def __init__(
        self,
        sock: socket.socket,
        label: str,
        window: int | None,
        *,
        interval: float | None = None,
        stop_at: float | None = None,
    ) -> None:
        self.sock = sock
        self.label = label
        self.window = window
        self.interval = interval
        self.stop_at = stop_at
        self.next_start: float | None = None  # when the next message may start (interval)
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
            f"<Connection {self.label} sent={self.bytes_sent} received={self.bytes_received}"
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
        stopping = self.stop_at is not None and self._next is not None
        if stopping and time.monotonic() >= (self.stop_at or 0.0):
            self._next = None  # --duration is over: start nothing more
        return self._next is None and not self.inflight

    def waiting_for_pace(self, now: float) -> bool:
        """True if the next message is due but its start time under --rate has not come."""
        if self.interval is None or self._next is None or self.next_start is None:
            return False
        return now < self.next_start

    def wants_write(self) -> bool:
        """True if there are bytes to send now without exceeding the window."""
        return self._send_budget() > 0

    def _send_budget(self) -> int:
        """Bytes to send now: the rest of the current message, else the next one if allowed."""
        current = self.inflight[-1] if self.inflight else None
        if current is not None and current.sent < len(current.data):
            unsent = len(current.data) - current.sent
        elif self._next is not None and (self.window is not None or current is None):
            if self.next_start is not None and time.monotonic() < self.next_start:
                return 0
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
            if self.interval is not None:
                self.next_start = next_start(self.next_start, time.monotonic(), self.interval)
        end = message.sent + budget
        if message.sent == 0:
            message.started_at = time.perf_counter()
        try:
            sent = send_some(self.sock, memoryview(message.data)[message.sent : end])
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
            data = recv_some(self.sock)
        except OSError as exc:
            raise self._io_error(exc) from None
        if data is None:
            return False
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
        return io_error(exc, self.label, progress)


def run(connections: Sequence[Connection], timeout: float | None) -> None:
    """Drive connections until each is done.

    Args:
        connections: non-blocking connections with messages fed.
        timeout: seconds a connection may wait for the server without a byte moving
            (a connection waiting for its next start under --rate is not waiting for it).

    Raises:
        TimedOut: a connection made no progress for timeout seconds.
        ClientError: a connection failed; see Connection.on_readable().
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
            wake_at = [deadlines[fd] for fd in masks] if timeout else []
            wake_at += [c.next_start or now for c in connections if c.waiting_for_pace(now)]
            if stop_at := [c.stop_at for c in connections if c.stop_at is not None]:
                wake_at.append(min(stop_at))
            # poll() takes milliseconds: round up, or it wakes just too early
            wait_ms = max(0, math.ceil((min(wake_at) - now) * 1000)) if wake_at else None
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
                c = by_fd[fd]
                if not c.inflight:  # waiting for its own next start, not for the server
                    deadlines[fd] = now + (timeout or 0.0)
                elif timeout and now >= deadlines[fd]:
                    raise TimedOut(
                        f"timed out after {timeout:g} s waiting for {c.label}"
                        f" ({c.bytes_received} of {c.bytes_sent} bytes echoed)"
                    )
    finally:
        for fd in masks:
            poller.unregister(fd)
