"""Per-client state and the echo itself; no epoll calls here.

The reactor calls ``conn.on_event(events)`` and gets back the epoll mask the
connection wants next, or CLOSE; after unregistering it calls ``conn.close()``,
which tells the owner (the service) so that it can account for the connection.
``on_event`` is swapped per state (echoing in level or edge mode, draining for
shutdown, lingering after our FIN) so that the hot path tests no state flag it
does not need.
"""

from __future__ import annotations

import _socket
import errno
import select
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Final, Protocol

from epolld.core.loop import CLOSE

if TYPE_CHECKING:
    from epolld.handoff import State, StateWriter

EPOLLIN: Final = select.EPOLLIN
EPOLLOUT: Final = select.EPOLLOUT
EPOLLRDHUP: Final = select.EPOLLRDHUP
EPOLLET: Final = select.EPOLLET
# HUP and ERR are reported whatever the mask; they wake both directions, and the
# failing recv()/send() then tells why (the selectors.EpollSelector rule).
EPOLLHUP_ERR: Final = select.EPOLLHUP | select.EPOLLERR

NO_OUTPUT: Final = b""
LEVEL_READ: Final = EPOLLIN | EPOLLRDHUP
LEVEL_READ_WRITE: Final = EPOLLIN | EPOLLRDHUP | EPOLLOUT
# Edge mode registers once and never modifies: pausing is just not reading.
EDGE_MASK: Final = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET

# Edge mode reads until EAGAIN, but yields to other peers after this many recv() calls or
# this many bytes in one event, whichever comes first (the rest is rescheduled). The byte
# budget is level mode's one read: 16 reads of 256 KiB let one firehose hold the loop for
# 4 MiB, and a ping-pong peer beside two of them saw a p99 of 20-70 ms instead of ~1 ms.
EDGE_READS_PER_EVENT: Final = 16
EDGE_BYTES_PER_EVENT: Final = 256 * 1024


class ConnectionOwner(Protocol):
    def connection_closed(self, conn: Connection) -> None:
        """Account for a connection that is closing (its socket is still open)."""
        ...

    def splice_failed(self, conn: Connection, events: int) -> None:
        """No pipe could be had for a splice connection: serve it by copying instead."""
        ...


PipeFactory = Callable[[], "tuple[int, int, int] | None"]


class SharedSettings:
    """What every connection of one service shares. One slot per connection instead of
    five (at 10,000 connections every byte per connection shows in the resident set),
    and a reload changes it for all of them at once.

    Args:
        high_water: stop reading above this much pending output.
        low_water: resume reading at or below this much.
        reschedule: called with (fd, events) when work remains that no new epoll
            edge will announce (edge mode budget, resumed reading).
        owner: told when a connection closes.
        make_pipe: a splice connection's pipe, made at its first read (or None).
        name_peers: work out each peer's name before its socket closes (it is logged).
    """

    __slots__ = ("high_water", "low_water", "make_pipe", "name_peers", "owner", "reschedule")

    def __init__(
        self,
        *,
        high_water: int,
        low_water: int,
        reschedule: Callable[[tuple[int, int]], None],
        owner: ConnectionOwner,
        make_pipe: PipeFactory,
        name_peers: bool = False,
    ) -> None:
        self.name_peers = name_peers
        self.high_water = high_water
        self.low_water = low_water
        self.reschedule = reschedule
        self.owner = owner
        self.make_pipe = make_pipe


# The address family as a plain int, without socket.family's conversion to an enum.
_family: Final[Callable[[socket.socket], int]] = _socket.socket.family.__get__


def adopt_socket(fd: int, family: int | None) -> socket.socket:
    """A handed-over connection's socket object, non-blocking.

    With its family known (records written since it was kept), nothing is asked of the
    kernel: the file is the one the previous process set O_NONBLOCK on, and
    SOCK_NONBLOCK in the type only sets the object's timeout to 0 (CPython's
    init_sockobject). Otherwise socket() asks for family, type and protocol, and
    setblocking() sets the flag: four system calls per connection, 1.6 µs at 100,000.
    """
    if family is None:
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        return sock
    return socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK, 0, fd)


def format_peer(family: int, addr: Any) -> str:
    """ "127.0.0.1:43454", "[::1]:43454", or "unix"."""
    if family == socket.AF_INET6:
        return f"[{addr[0]}]:{addr[1]}"
    if family == socket.AF_INET:
        return f"{addr[0]}:{addr[1]}"
    return "unix"


class Connection:
    """One client: its socket, pending output and counters; level-triggered.

    The state lives in the class, not in a per-connection bound method: EdgeConnection
    is the edge-triggered twin, and a graceful shutdown switches ``__class__`` to
    DrainingConnection, then LingeringConnection (no subclass adds a slot). A bound
    method per connection would cost 64 bytes each.

    Args:
        sock: the accepted, non-blocking socket.
        ip: the peer's IP for per-address limits (interned), "" for Unix sockets.
        buf: the loop's read buffer, shared by every connection (the loop is single-
            threaded, and each echo is sent or copied out before the next read);
            its length is the read size.
        shared: the service's SharedSettings.
        now: the loop's clock at accept time.
        peer: printable peer address; None: worked out from the socket when needed.
    """

    __slots__ = (
        "_peer",
        "active_at",
        "buf",
        "bytes_in",
        "dropped",
        "eof",
        "error",
        "fd",
        "idle_bucket",
        "ip",
        "mask",
        "opened_at",
        "out",
        "reading",
        "reason",
        "shared",
        "sock",
    )
    INITIAL_MASK: ClassVar[int] = LEVEL_READ
    DRAINING: ClassVar[type[Connection]]  # the class for each phase of a graceful close
    LINGERING: ClassVar[type[Connection]]

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
        self.sock = sock
        self.fd = sock.fileno()
        self.ip = ip
        self._peer = peer
        self.buf = buf
        self.shared = shared
        # Pending output; a shared empty bytes until something waits (a bytearray per
        # connection is 57 bytes, 0.5 MiB at 10,000 connections).
        self.out: bytes | bytearray = NO_OUTPUT
        self.reading = True  # False while paused by backpressure or after EOF
        self.eof = False
        self.reason = ""
        self.error = ""  # errno name when reason is "error"
        self.bytes_in = 0
        self.dropped = 0  # received bytes a forced close threw away unsent
        self.opened_at = now
        self.active_at = now
        self.idle_bucket: dict[Any, None] | None = None  # see IdleTimer
        self.mask = self.INITIAL_MASK

    @property
    def edge(self) -> bool:
        return bool(self.mask & EPOLLET)  # edge connections keep EDGE_MASK for life

    @property
    def peer(self) -> str:
        """The peer's address; worked out on first use (most connections never log it)."""
        if self._peer is None:
            try:
                self._peer = format_peer(self.sock.family, self.sock.getpeername())
            except OSError:  # reset before anyone asked
                return "unknown"
        return self._peer

    @peer.setter
    def peer(self, name: str) -> None:
        self._peer = name

    def close(self) -> None:
        """Release the descriptors (the reactor has unregistered the socket already), then
        tell the owner: whatever it logs, the descriptors are gone by then."""
        self._release()
        self.shared.owner.connection_closed(self)

    def _release(self) -> None:
        if self.shared.name_peers:
            self.peer  # noqa: B018  # named while the socket can still say who it was
        self.sock.close()

    def pending(self) -> int:
        """Bytes received and not yet echoed."""
        return len(self.out)

    def discard_pending(self) -> None:
        """Drop unsent output before a forced close."""
        self.dropped += self.pending()
        self.out = NO_OUTPUT

    @property
    def bytes_out(self) -> int:
        """Bytes echoed: what was received less what waits or was dropped. Derived, so that
        the hot path counts one direction only."""
        return self.bytes_in - self.pending() - self.dropped

    def __repr__(self) -> str:
        state = "eof" if self.eof else "reading" if self.reading else "paused"
        kind = type(self).__name__
        return f"<{kind} fd={self.fd} peer={self.peer} {state} pending={self.pending()}>"

    # -- handoff (restart without dropping it; epolld/handoff.py) ----------------

    HANDOFF_KIND: ClassVar[str] = "connection"

    def handoff_state(self, out: StateWriter) -> dict[str, Any]:
        """This connection's record: the socket, pending output, flags, counters, times."""
        return {
            "kind": self.HANDOFF_KIND,
            "fd": out.fd(self.fd),
            "family": _family(self.sock),
            "edge": self.edge,
            "io": "copy",
            "ip": self.ip,
            "peer": self._peer,
            "reading": self.reading,
            "eof": self.eof,
            "reason": self.reason,
            "bytes_in": self.bytes_in,
            "dropped": self.dropped,
            # CLOCK_MONOTONIC is one clock for every process of a boot.
            "opened_at": self.opened_at,
            "active_at": self.active_at,
            "out": out.data(self.out) if self.out else None,
        }

    @classmethod
    def from_handoff(
        cls, record: dict[str, Any], state: State, *, buf: memoryview, shared: SharedSettings
    ) -> Connection:
        """Rebuild a connection from its record (cls: the class for its trigger and io).

        Raises:
            HandoffError: its socket did not arrive. KeyError, TypeError: a bad record.
        """
        sock = adopt_socket(state.take_fd(record["fd"]), record.get("family"))
        conn = cls(
            sock,
            record["ip"],
            buf=buf,
            shared=shared,
            now=float(record["opened_at"]),
            peer=record["peer"],
        )
        conn.active_at = float(record["active_at"])
        conn.reading = bool(record["reading"])
        conn.eof = bool(record["eof"])
        conn.reason = str(record["reason"])
        conn.bytes_in = int(record["bytes_in"])
        conn.dropped = int(record["dropped"])
        conn._restore_pending(record, state)
        conn.mask = conn._resume_mask()
        return conn

    def _restore_pending(self, record: dict[str, Any], state: State) -> None:
        pending = state.data(record["out"])
        if pending:
            self.out = bytearray(pending)

    def _resume_mask(self) -> int:
        """The mask a restored connection registers with: what it would have returned."""
        if self.INITIAL_MASK & EPOLLET:
            return EDGE_MASK
        if self.pending():
            return LEVEL_READ_WRITE if self.reading else EPOLLOUT
        # Not reading with nothing to send is a close about to happen: EPOLLOUT fires at
        # once and on_event returns CLOSE.
        return LEVEL_READ if self.reading else EPOLLOUT

    # -- echoing ---------------------------------------------------------------

    def on_event(self, ev: int) -> int:
        """Level-triggered: one recv() per event, so every peer gets its turn.

        The send is inlined here and in EdgeConnection.on_event rather than a call to
        _echo(): these run once per event, and under callgrind the call was 5% of the
        instructions of a whole 1 KiB round trip (client included).
        """
        if ev & EPOLLHUP_ERR:
            return self._on_hangup()
        if ev & EPOLLOUT and self.out and not self._flush():
            return CLOSE
        if ev & EPOLLIN and self.reading:
            sock = self.sock
            try:
                n = sock.recv_into(self.buf)
            except BlockingIOError:
                n = -1
            except OSError as e:
                return self._fail(e)
            if n > 0:
                self.bytes_in += n
                if self.out:
                    self._buffer(self.buf[:n])
                else:
                    try:
                        sent = sock.send(self.buf[:n])
                    except BlockingIOError:
                        sent = 0
                    except OSError as e:
                        return self._fail(e)
                    if sent < n:
                        self._buffer(self.buf[sent:n])
            elif n == 0:
                self._on_eof()
        if self.out:
            return LEVEL_READ_WRITE if self.reading else EPOLLOUT
        return LEVEL_READ if self.reading else CLOSE

    def _buffer(self, data: memoryview) -> None:
        """Keep what the kernel did not take; stop reading above the high-water mark."""
        if self.out:
            self.out += data
        else:
            self.out = bytearray(data)
        if len(self.out) >= self.shared.high_water:
            self.reading = False

    def _echo(self, data: memoryview) -> bool:
        """Send data back now and keep what the kernel did not take (the hot paths inline
        this). False: the connection failed."""
        if not self.out:
            try:
                sent = self.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as e:
                self._fail(e)
                return False
            data = data[sent:]
        if data:
            self._buffer(data)
        return True

    def _flush(self) -> bool:
        """Send pending output; resume reading below the low-water mark. False: failed."""
        try:
            sent = self.sock.send(self.out)
        except BlockingIOError:
            return True
        except OSError as e:
            self._fail(e)
            return False
        del self.out[:sent]  # type: ignore[union-attr]  # non-empty: a bytearray; O(1) at the front
        if not self.reading and not self.eof and len(self.out) <= self.shared.low_water:
            self.reading = True
        return True

    def _on_eof(self) -> None:
        """The peer shut down its write side: stop reading, flush, then close."""
        self.eof = True
        self.reading = False
        self.reason = self.reason or "eof"

    def _on_hangup(self) -> int:
        """HUP or ERR: find out why through the socket error, then close."""
        code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._fail(OSError(code, errno.errorcode.get(code, str(code))))
        else:
            self.reason = self.reason or "eof"
        return CLOSE

    def _fail(self, e: OSError) -> int:
        """Record why the connection failed; the loop closes it and logs the reason."""
        if e.errno in (errno.ECONNRESET, errno.EPIPE):
            self.reason = "reset"
        else:
            self.reason = "error"
            self.error = errno.errorcode.get(e.errno or 0, str(e))
        return CLOSE

    # -- graceful shutdown -------------------------------------------------------

    def begin_shutdown(self) -> int:
        """Echo what has arrived, then FIN; the loop calls this once on SIGTERM."""
        self.reason = self.reason or "shutdown"
        if self.eof:  # already flushing towards close
            return self._wait_writable() if self.pending() else CLOSE
        self.__class__ = self.DRAINING
        return self.on_event(EPOLLIN)

    def _on_draining(self, ev: int) -> int:
        if ev & EPOLLHUP_ERR:
            return self._on_hangup()
        if self.out and not self._flush():
            return CLOSE
        # Read (and echo) until the socket says EAGAIN with nothing left to send.
        for _ in range(EDGE_READS_PER_EVENT):
            if self.out:
                return self._wait_writable()
            if self.eof:
                return CLOSE
            try:
                n = self.sock.recv_into(self.buf)
            except BlockingIOError:
                return self._shut_write()
            except OSError as e:
                return self._fail(e)
            if n:
                self.bytes_in += n
                if not self._echo(self.buf[:n]):
                    return CLOSE
            else:
                self._on_eof()
        self.shared.reschedule((self.fd, EPOLLIN))
        return self._wait_writable() if self.out else self._wait_readable()

    def _shut_write(self) -> int:
        """Send our FIN, then discard what the peer still sends until it closes
        (a lingering close: closing with unread data would send a reset)."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as e:
            return self._fail(e)
        self.__class__ = self.LINGERING
        return self._wait_readable()

    def _on_lingering(self, ev: int) -> int:
        for _ in range(EDGE_READS_PER_EVENT):
            try:
                n = self.sock.recv_into(self.buf)
            except BlockingIOError:
                return self._wait_readable()
            except OSError:
                return CLOSE  # the reason stays "shutdown": the peer got all we had
            if not n:
                return CLOSE
        self.shared.reschedule((self.fd, EPOLLIN))
        return self._wait_readable()

    def _wait_readable(self) -> int:
        return EDGE_MASK if self.edge else LEVEL_READ

    def _wait_writable(self) -> int:
        return EDGE_MASK if self.edge else EPOLLOUT


class EdgeConnection(Connection):
    """Edge-triggered: registered once with EDGE_MASK, never modified."""

    __slots__ = ()
    INITIAL_MASK = EDGE_MASK

    def on_event(self, ev: int) -> int:
        """Edge-triggered: read until drained, within a budget, then yield."""
        if ev & EPOLLHUP_ERR:
            return self._on_hangup()
        if ev & EPOLLOUT and self.out:
            was_paused = not self.reading and not self.eof
            if not self._flush():
                return CLOSE
            # Data that waited while we were paused raises no new edge: go and read it.
            if was_paused and self.reading:
                ev |= EPOLLIN
        if ev & EPOLLIN and self.reading:
            sock = self.sock
            buf = self.buf
            # A countdown, not "for _ in range()", and no bound-method locals: measured
            # under callgrind, those cost edge mode 17% more instructions than level.
            budget = EDGE_READS_PER_EVENT
            left = EDGE_BYTES_PER_EVENT
            while True:
                try:
                    n = sock.recv_into(buf)
                except BlockingIOError:
                    break
                except OSError as e:
                    return self._fail(e)
                if not n:
                    self._on_eof()
                    break
                self.bytes_in += n
                if self.out:
                    self._buffer(buf[:n])
                else:
                    try:
                        sent = sock.send(buf[:n])
                    except BlockingIOError:
                        sent = 0
                    except OSError as e:
                        return self._fail(e)
                    if sent < n:
                        self._buffer(buf[sent:n])
                # A short read drained the socket: the next data raises a new edge, so
                # skip the recv() that would only say EAGAIN (nginx does the same).
                # Unless the peer also shut down: then read on to see the EOF. (A
                # synthetic event for bytes whose edge went to another handler, such as
                # a PROXY header reader, carries EPOLLRDHUP for the same reason.)
                if (n < len(buf) and not ev & EPOLLRDHUP) or not self.reading:
                    break
                budget -= 1
                left -= n
                if not budget or left <= 0:
                    self.shared.reschedule((self.fd, ev & (EPOLLIN | EPOLLRDHUP)))
                    break
        return EDGE_MASK if self.out or self.reading else CLOSE


class DrainingConnection(Connection):
    """Shutting down: echo what arrives until EAGAIN, then FIN."""

    __slots__ = ()
    on_event = Connection._on_draining


class LingeringConnection(Connection):
    """After our FIN: discard what the peer still sends until it closes."""

    __slots__ = ()
    on_event = Connection._on_lingering


Connection.DRAINING = DrainingConnection
Connection.LINGERING = LingeringConnection
