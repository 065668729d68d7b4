"""The TCP (and Unix stream) connection kinds of discard, chargen and info.

Each is a Connection whose state lives in its class (as tcp/connection.py's): a level
and an edge class per service, and one lingering class after our FIN. Admission picks
the class once, at accept (`open_service`); echo connections never see these.

- discard (RFC 863): read and drop; the client's FIN is answered with ours (close).
- chargen (RFC 864): send the pattern as fast as the client reads, straight from one
  shared, read-only window of it: nothing is ever buffered here, whatever high_water
  says (the kernel's send buffer is the only queue). What the client sends is read and
  dropped; its FIN does not stop the stream (nc sends one at the end of its input), only
  its close or reset.
- info: one line of JSON about the connection (info.py) as soon as it is accepted, then
  FIN, then discard until the client closes (a lingering close: no reset).

bytes_in counts what was received (and dropped), bytes_out what was sent. With io:
splice these copy: there is nothing to splice (discard and info have no stream to move,
chargen's source is memory).
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any, ClassVar, Final

from epolld.core.loop import CLOSE
from epolld.services import info, pattern
from epolld.tcp.connection import (
    EDGE_BYTES_PER_EVENT,
    EDGE_MASK,
    EDGE_READS_PER_EVENT,
    EPOLLET,
    EPOLLHUP_ERR,
    EPOLLIN,
    EPOLLOUT,
    LEVEL_READ,
    LEVEL_READ_WRITE,
    Connection,
    SharedSettings,
)

if TYPE_CHECKING:
    from epolld.handoff import State, StateWriter

CHUNK: Final = 64 * 1024  # chargen's most per send()
WINDOW: Final = pattern.window(CHUNK)
CYCLE_BYTES: Final = pattern.CYCLE_BYTES
HANDOFF_KIND: Final = "service_connection"


class ServiceConnection(Connection):
    """What the service connections share: bytes sent (bytes_out), a graceful stop that
    sends FIN at once (there is no echo to finish), their handoff record."""

    __slots__ = ("sent",)
    SERVICE: ClassVar[str]  # discard, chargen, info
    CLOSING: ClassVar[bool] = False  # our FIN is sent: only the client's close is awaited
    HANDOFF_KIND = HANDOFF_KIND

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
        self.sent = 0

    @property
    def bytes_out(self) -> int:
        return self.sent

    def begin_shutdown(self) -> int:
        """SIGTERM: FIN now, then discard until the client closes."""
        self.reason = self.reason or "shutdown"
        self.out = b""
        return self._shut_write()

    def _level_mask(self) -> int:
        return LEVEL_READ

    def _resume_mask(self) -> int:
        return EDGE_MASK if self.INITIAL_MASK & EPOLLET else self._level_mask()

    def handoff_state(self, out: StateWriter) -> dict[str, Any]:
        """The echo connection's record, with the service and the bytes sent (chargen
        resumes its pattern from them)."""
        record = super().handoff_state(out)
        record["service"] = self.SERVICE
        record["closing"] = self.CLOSING
        record["sent"] = self.sent
        return record

    def _recv_dropping(self, edge: bool) -> int:
        """Read and drop what the client sent: once (level) or until EAGAIN within the
        per-event budget (edge). Returns 1 to go on, 0 at the client's FIN, -1 on an
        error (the reason is set)."""
        sock, buf = self.sock, self.buf
        budget = EDGE_READS_PER_EVENT if edge else 1
        left = EDGE_BYTES_PER_EVENT
        while budget:
            try:
                n = sock.recv_into(buf)
            except BlockingIOError:
                return 1
            except OSError as e:
                self._fail(e)
                return -1
            if not n:
                return 0
            self.bytes_in += n
            budget -= 1
            left -= n
            if left <= 0:
                break
        if edge:  # more may wait that no new edge announces
            self.shared.reschedule((self.fd, EPOLLIN))
        return 1


def _lingering(service: type[ServiceConnection]) -> type[ServiceConnection]:
    """The class a service's connection becomes after our FIN: discard what the client
    still sends until it closes (the service's name stays, for the counts)."""
    name = f"{service.__name__.removesuffix('Connection')}Lingering"
    body = {
        "__slots__": (),
        "on_event": Connection._on_lingering,
        "_level_mask": ServiceConnection._level_mask,  # LEVEL_READ
        "CLOSING": True,
    }
    cls: type[ServiceConnection] = type(name, (service,), body)
    return cls


class DiscardConnection(ServiceConnection):
    """discard, level-triggered."""

    __slots__ = ()
    SERVICE = "discard"
    INITIAL_MASK = LEVEL_READ

    def on_event(self, ev: int) -> int:
        if ev & EPOLLHUP_ERR:
            return self._on_hangup()
        got = self._recv_dropping(edge=False)
        if got > 0:
            return LEVEL_READ
        if got == 0:
            self._on_eof()  # closing now sends our FIN: nothing was left unread
        return CLOSE


class EdgeDiscardConnection(DiscardConnection):
    """discard, edge-triggered."""

    __slots__ = ()
    INITIAL_MASK = EDGE_MASK

    def on_event(self, ev: int) -> int:
        if ev & EPOLLHUP_ERR:
            return self._on_hangup()
        if not ev & EPOLLIN:
            return EDGE_MASK
        got = self._recv_dropping(edge=True)
        if got > 0:
            return EDGE_MASK
        if got == 0:
            self._on_eof()
        return CLOSE


class ChargenConnection(ServiceConnection):
    """chargen, level-triggered: one send() per writable event."""

    __slots__ = ()
    SERVICE = "chargen"
    INITIAL_MASK = LEVEL_READ_WRITE

    def _level_mask(self) -> int:
        # After the client's FIN its read side stays readable: watching it would spin.
        return EPOLLOUT if self.eof else LEVEL_READ_WRITE

    def on_event(self, ev: int) -> int:
        if ev & EPOLLHUP_ERR:
            return self._on_hangup()
        if ev & EPOLLIN and not self.eof and self._drop_input(edge=False) < 0:
            return CLOSE
        if ev & EPOLLOUT:
            start = self.sent % CYCLE_BYTES
            try:
                self.sent += self.sock.send(WINDOW[start : start + CHUNK])
            except BlockingIOError:
                pass
            except OSError as e:
                return self._fail(e)
        return EPOLLOUT if self.eof else LEVEL_READ_WRITE

    def _drop_input(self, edge: bool) -> int:
        got = self._recv_dropping(edge)
        if got == 0:
            self.eof = True  # the stream goes on; the reason stays for the close
            self.reason = "eof"
        return got


class EdgeChargenConnection(ChargenConnection):
    """chargen, edge-triggered: send until the socket is full, within a budget."""

    __slots__ = ()
    INITIAL_MASK = EDGE_MASK

    def on_event(self, ev: int) -> int:
        if ev & EPOLLHUP_ERR:
            return self._on_hangup()
        if ev & EPOLLIN and not self.eof and self._drop_input(edge=True) < 0:
            return CLOSE
        if ev & EPOLLOUT:
            sock = self.sock
            left = EDGE_BYTES_PER_EVENT
            while True:
                start = self.sent % CYCLE_BYTES
                try:
                    n = sock.send(WINDOW[start : start + CHUNK])
                except BlockingIOError:
                    break  # a new edge comes when the client has read
                except OSError as e:
                    return self._fail(e)
                self.sent += n
                left -= n
                if n < CHUNK:
                    break  # the send buffer is full: the next edge says when it is not
                if left <= 0:
                    self.shared.reschedule((self.fd, EPOLLOUT))
                    break
        return EDGE_MASK


class InfoConnection(ServiceConnection):
    """info, level-triggered: send the line (out), FIN, linger."""

    __slots__ = ()
    SERVICE = "info"
    INITIAL_MASK = EPOLLOUT

    def _level_mask(self) -> int:
        return EPOLLOUT

    def on_event(self, ev: int) -> int:
        if ev & EPOLLHUP_ERR:
            return self._on_hangup()
        if self.out:
            try:
                n = self.sock.send(self.out)
            except BlockingIOError:
                n = 0
            except OSError as e:
                return self._fail(e)
            self.sent += n
            self.out = self.out[n:]
            if self.out:
                return self._wait_writable()
        self.reason = self.reason or "eof"
        return self._shut_write()


class EdgeInfoConnection(InfoConnection):
    """info, edge-triggered."""

    __slots__ = ()
    INITIAL_MASK = EDGE_MASK


_CLASSES: Final[dict[tuple[str, bool], type[ServiceConnection]]] = {
    ("discard", False): DiscardConnection,
    ("discard", True): EdgeDiscardConnection,
    ("chargen", False): ChargenConnection,
    ("chargen", True): EdgeChargenConnection,
    ("info", False): InfoConnection,
    ("info", True): EdgeInfoConnection,
}
# After our FIN, edge or level alike (the mask says which).
_LINGERING: Final = {name: _lingering(cls) for (name, edge), cls in _CLASSES.items() if not edge}
for (_name, _edge), _cls in _CLASSES.items():
    _cls.LINGERING = _cls.DRAINING = _LINGERING[_name]


def open_service(
    service: str,
    sock: socket.socket,
    ip: str,
    *,
    edge: bool,
    buf: memoryview,
    shared: SharedSettings,
    now: float,
    peer: str | None,
    listener: str,
    header: Any = None,
) -> ServiceConnection:
    """The connection of a service listener's client (admission registers it)."""
    conn = _CLASSES[service, edge](sock, ip, buf=buf, shared=shared, now=now, peer=peer)
    if service == "info":
        try:
            conn.out = info.line(info.tcp_fields(sock, listener, header))
        except OSError:
            conn.out = b""  # gone already: the first event closes it
        conn.reading = False
    return conn


def restore(
    record: dict[str, Any], state: State, *, buf: memoryview, shared: SharedSettings
) -> ServiceConnection:
    """A service connection the previous process handed over (its kind: HANDOFF_KIND).

    Raises:
        HandoffError: its socket did not arrive. KeyError, TypeError: a bad record.
    """
    edge = bool(record["edge"])
    service = str(record["service"])
    cls = _LINGERING[service] if record.get("closing") else _CLASSES[service, edge]
    conn = cls.from_handoff(record, state, buf=buf, shared=shared)
    assert isinstance(conn, ServiceConnection)
    conn.sent = int(record["sent"])
    conn.mask = EDGE_MASK if edge else conn._level_mask()
    return conn
