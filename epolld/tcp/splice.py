"""Zero-copy echo (`io: splice`): socket -> pipe -> socket with splice(2).

The bytes never enter Python: each connection owns a pipe, made at its first
read, that is both the kernel-side buffer and the backpressure bound (reading
stops while it is full). That costs two descriptors per connection; beyond the
service's descriptor budget, or when pipe2() fails, a copying Connection serves
the client instead, so no client is dropped for it.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
import termios
from typing import TYPE_CHECKING, Any, Final

from epolld.core.loop import CLOSE
from epolld.tcp.connection import (
    EDGE_BYTES_PER_EVENT,
    EDGE_MASK,
    EDGE_READS_PER_EVENT,
    EPOLLHUP_ERR,
    EPOLLIN,
    EPOLLOUT,
    EPOLLRDHUP,
    LEVEL_READ,
    LEVEL_READ_WRITE,
    Connection,
    EdgeConnection,
    SharedSettings,
)

if TYPE_CHECKING:
    from epolld.handoff import State, StateWriter

SPLICE_FLAGS: Final = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
F_SETPIPE_SZ: Final = getattr(fcntl, "F_SETPIPE_SZ", 1031)
DEFAULT_PIPE_BYTES: Final = 64 * 1024  # Linux's default pipe capacity (pipe(7))


def _unread(fd: int) -> int:
    """Bytes waiting in a socket's receive queue (FIONREAD, alias SIOCINQ, tcp(7))."""
    return int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, bytes(4)), sys.byteorder)


def make_pipe(size: int) -> tuple[int, int, int]:
    """A non-blocking pipe resized towards size bytes; returns (read fd, write fd, capacity).

    A message larger than the pipe needs several splice() round trips: that is
    why the 64 KiB default pipe echoed 128 KiB messages slowly. Growing it may be
    refused (pipe-max-size, or pipe-user-pages-soft for many pipes of one user);
    then the default stays and everything still works, only with more rounds.

    Raises:
        OSError: pipe2() failed (EMFILE/ENFILE): the caller falls back to copying.
    """
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        capacity = fcntl.fcntl(w, F_SETPIPE_SZ, size)
    except OSError:
        capacity = DEFAULT_PIPE_BYTES
    return r, w, capacity


class SpliceConnection(Connection):
    """A Connection whose pending output lives in a pipe instead of a bytearray.

    The pipe is made at the first read, not at accept: an idle client holds one
    descriptor, and accepting 10,000 clients does not wait for 10,000 pipe2() and
    F_SETPIPE_SZ calls (they overflowed the listen backlog).
    """

    __slots__ = ("capacity", "pipe_r", "pipe_w", "piped")

    def __init__(
        self,
        sock: socket.socket,
        ip: str,
        *,
        buf: memoryview,
        shared: SharedSettings,
        now: float,
        peer: str | None = None,
    ) -> None:
        super().__init__(sock, ip, buf=buf, shared=shared, now=now, peer=peer)
        self.pipe_r = self.pipe_w = -1  # no pipe yet
        self.capacity = 0
        self.piped = 0  # bytes in the pipe: received, not yet echoed

    def _release(self) -> None:
        if self.pipe_r >= 0:
            os.close(self.pipe_r)
            os.close(self.pipe_w)
        super()._release()

    def pending(self) -> int:
        return self.piped

    def discard_pending(self) -> None:
        self.dropped += self.piped
        self.piped = 0

    def handoff_state(self, out: StateWriter) -> dict[str, Any]:
        """The copy record, plus the pipe itself: its bytes travel in the kernel."""
        record = super().handoff_state(out)
        record["io"] = "splice"
        if self.pipe_r >= 0:
            record["pipe"] = [out.fd(self.pipe_r), out.fd(self.pipe_w)]
            record["capacity"] = self.capacity
            record["piped"] = self.piped
        return record

    def _restore_pending(self, record: dict[str, Any], state: State) -> None:
        pipe = record.get("pipe")
        if pipe:
            self.pipe_r = state.take_fd(pipe[0])
            self.pipe_w = state.take_fd(pipe[1])
            self.capacity = int(record["capacity"])
            self.piped = int(record["piped"])

    def _has_pipe(self, ev: int) -> bool:
        """Make the pipe at the first read. False: none could be had, and the owner has
        put a copying connection in this one's place (the event went to it)."""
        pipe = self.shared.make_pipe()
        if pipe is None:
            self.shared.owner.splice_failed(self, ev)
            return False
        self.pipe_r, self.pipe_w, self.capacity = pipe
        return True

    def on_event(self, ev: int) -> int:
        if ev & EPOLLHUP_ERR:
            return self._on_hangup()
        if ev & EPOLLOUT and self.piped and not self._flush():
            return CLOSE
        if ev & EPOLLIN and self.reading:
            if self.pipe_w < 0 and not self._has_pipe(ev):
                return self.mask
            if self._pull() is False:
                return CLOSE
        if self.piped:
            return LEVEL_READ_WRITE if self.reading else EPOLLOUT
        return LEVEL_READ if self.reading else CLOSE

    def _pull(self) -> int | bool | None:
        """Move what the socket has into the pipe and on to the peer.

        Returns the bytes moved in, None when the socket had nothing (EAGAIN), or
        False when the connection failed.
        """
        try:
            moved = os.splice(self.fd, self.pipe_w, self.capacity - self.piped, flags=SPLICE_FLAGS)
        except BlockingIOError:
            if self.piped and _unread(self.fd):
                # Data waits but the pipe is out of slots (one per segment): read again
                # once the echo drains, which _flush() reports. (Stopping on an empty
                # socket instead would miss the EOF while the peer does not read.)
                self.reading = False
            return None
        except OSError as e:
            self._fail(e)
            return False
        if not moved:
            self._on_eof()
            return 0
        self.bytes_in += moved
        self.piped += moved
        if not self._flush():
            return False
        return moved

    def _flush(self) -> bool:
        try:
            sent = os.splice(self.pipe_r, self.fd, self.piped, flags=SPLICE_FLAGS)
        except BlockingIOError:
            sent = 0
        except OSError as e:
            self._fail(e)
            return False
        self.piped -= sent
        # The pipe is the buffer: read while it has room.
        self.reading = not self.eof and self.piped < self.capacity
        return True

    def _on_draining(self, ev: int) -> int:
        if ev & EPOLLHUP_ERR:
            return self._on_hangup()
        if self.piped and not self._flush():
            return CLOSE
        if self.pipe_w < 0 and not self.eof and not self._has_pipe(ev):
            return self.mask
        for _ in range(EDGE_READS_PER_EVENT):
            if self.piped:
                return self._wait_writable()
            if self.eof:
                return CLOSE
            moved = self._pull()
            if moved is False:
                return CLOSE
            if moved is None:
                return self._shut_write()
        self.shared.reschedule((self.fd, EPOLLIN))
        return self._wait_writable() if self.piped else self._wait_readable()


class EdgeSpliceConnection(SpliceConnection):
    """Edge-triggered splice: registered once with EDGE_MASK, never modified."""

    __slots__ = ()
    INITIAL_MASK = EDGE_MASK

    def on_event(self, ev: int) -> int:
        if ev & EPOLLHUP_ERR:
            return self._on_hangup()
        if ev & EPOLLOUT and self.piped:
            was_full = not self.reading and not self.eof
            if not self._flush():
                return CLOSE
            if was_full and self.reading:  # no new edge will announce what waited
                ev |= EPOLLIN
        if ev & EPOLLIN and self.reading:
            if self.pipe_w < 0 and not self._has_pipe(ev):
                return self.mask
            # Read until EAGAIN: a short splice is no sign of a drained socket (unlike a
            # short recv), because a pipe holds one segment per slot.
            left = EDGE_BYTES_PER_EVENT
            for _ in range(EDGE_READS_PER_EVENT):
                moved = self._pull()
                if moved is False:
                    return CLOSE
                if moved is None or not self.reading:
                    break
                left -= moved
                if left <= 0:
                    self.shared.reschedule((self.fd, ev & (EPOLLIN | EPOLLRDHUP)))
                    break
            else:
                self.shared.reschedule((self.fd, ev & (EPOLLIN | EPOLLRDHUP)))
        return EDGE_MASK if self.piped or self.reading else CLOSE


class DrainingSpliceConnection(SpliceConnection):
    __slots__ = ()
    on_event = SpliceConnection._on_draining


class LingeringSpliceConnection(SpliceConnection):
    __slots__ = ()
    on_event = Connection._on_lingering


SpliceConnection.DRAINING = DrainingSpliceConnection
SpliceConnection.LINGERING = LingeringSpliceConnection


def connection_class(edge: bool, splice: bool) -> type[Connection]:
    """The class a new connection starts as, for a trigger mode and an io mode."""
    if splice:
        return EdgeSpliceConnection if edge else SpliceConnection
    return EdgeConnection if edge else Connection
