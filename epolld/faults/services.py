"""discard, chargen and info on a TCP (or Unix) listener with `faults:`.

Chosen at accept (service/admission.py) instead of services/stream.py's classes, only
for a service listener with faults: the others keep their classes and pay nothing. Each
is a FaultyConnection (connection.py): its Shaper, timers, deadline, FIN and RST (once the
send queue is empty) are the echo's; what goes into the Shaper is the service's output.
config.py refuses the keys a service has no use for, at their line.

- chargen: the generated pattern goes through the Shaper: `bandwidth` shapes it (bursts
  of 64 KiB), close_after_bytes / reset_after_bytes count bytes sent (exactly N, then FIN
  or RST), close_after / reset_after end it at that time. `delay` (plus jitter) delays
  the start of the stream, once: delaying every chunk would only stall a stream that has
  no requests to answer.
- discard: nothing is sent, so only the ends apply: close_after_bytes /
  reset_after_bytes count bytes received (FIN or RST once N have arrived), close_after /
  reset_after at that time after accept.
- info: the line waits `delay` (plus jitter); close_after_bytes / reset_after_bytes cut
  it after N bytes, then FIN or RST (N at or above its length: all of it first);
  close_after / reset_after, if they come before the line has gone, send FIN or RST
  instead of it. Once the whole line is out, FIN as without faults.

bytes_in counts what was received (and dropped), bytes_out what was sent. Their handoff
record is the fault connection's (`connection` with its faults) naming the service:
what was produced and not sent travels as pending output, chargen resumes its pattern.
"""

from __future__ import annotations

import dataclasses
import socket
from typing import TYPE_CHECKING, Any, ClassVar, Final

from epolld.core.loop import CLOSE
from epolld.faults.connection import FaultPlan, FaultyConnection
from epolld.faults.shaper import Shaper
from epolld.faults.timers import PARKED
from epolld.services import info
from epolld.services.stream import CHUNK, CYCLE_BYTES, WINDOW
from epolld.tcp.connection import (
    EDGE_BYTES_PER_EVENT,
    EDGE_MASK,
    EDGE_READS_PER_EVENT,
    EPOLLET,
    EPOLLHUP_ERR,
    EPOLLIN,
    EPOLLOUT,
    LEVEL_READ,
    Connection,
    SharedSettings,
)

if TYPE_CHECKING:
    from epolld.handoff import StateWriter

SEND_ROUNDS: Final = 4  # chargen: chunks generated and sent per event before yielding


class FaultyService(FaultyConnection):
    """What the three share: bytes produced (`generated`), the service's name for the
    counts, a stop that sends FIN at once, a record that names the service."""

    __slots__ = ("generated",)
    SERVICE: ClassVar[str]
    CLOSING: ClassVar[bool] = False  # our FIN is sent: only the client's close is awaited

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.generated = 0  # bytes the service produced (pushed into the shaper)

    @property
    def bytes_out(self) -> int:
        return self.generated - self.pending() - self.dropped

    @property
    def _now(self) -> float:
        return self.plan.reactor.now  # type: ignore[union-attr]

    def _drop_input(self) -> int:
        """Read and drop what the client sent: once (level) or until EAGAIN within the
        per-event budget (edge); bytes_in counts it. Returns 1 to go on, 0 at the client's
        FIN, -1 on an error (the reason is set)."""
        edge = self.mask & EPOLLET
        sock, buf = self.sock, self.buf
        total = 0
        for _ in range(EDGE_READS_PER_EVENT if edge else 1):
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
            total += n
            if total >= EDGE_BYTES_PER_EVENT:
                break
        if edge:  # more may wait that no new edge announces
            self.shared.reschedule((self.fd, EPOLLIN))
        return 1

    def _shut_write(self) -> int:
        for timer in (self.timer, self.deadline):  # nothing more to send or to end
            if timer is not None:
                timer.cancel()
        self.timer = self.deadline = None
        return super()._shut_write()

    def begin_shutdown(self) -> int:
        """SIGTERM: FIN now (what waits is dropped), then discard until the client closes;
        an RST already decided goes on."""
        if self.ending in ("close", "reset"):
            return self.mask
        self.reason = self.reason or "shutdown"
        self.ending = "drain"
        self.discard_pending()
        return self._shut_write()

    def handoff_state(self, out: StateWriter) -> dict[str, Any]:
        record = super().handoff_state(out)
        record["service"] = self.SERVICE
        record["closing"] = self.CLOSING
        record["generated"] = self.generated
        return record

    def resume(self, plan: FaultPlan, record: dict[str, Any], now: float) -> None:
        self.generated = int(record.get("generated") or 0)
        super().resume(plan, record, now)


class FaultyDiscard(FaultyService):
    """discard: read and drop; FIN or RST once the byte limit has been received."""

    __slots__ = ()
    SERVICE = "discard"

    def on_event(self, ev: int) -> int:
        if ev & EPOLLHUP_ERR:
            return self._on_hangup()
        if self.ending:  # an RST waiting for its moment: the timer decides
            return self._mask()
        before = self.bytes_in
        go_on = self._drop_input()
        if go_on < 0:
            return CLOSE
        shaper = self.shaper
        assert shaper is not None
        if shaper.limit_left is not None:  # here a limit of bytes received
            shaper.limit_left = max(0, shaper.limit_left - (self.bytes_in - before))
            if not shaper.limit_left:  # even if the client's FIN came with them
                self.ending = self._limit_kind()
                self.reading = False
                return self._end(self.ending, self._now)
        if not go_on:
            self._on_eof()  # the client's FIN: ours (close, nothing left unread)
            return CLOSE
        return self._mask()

    def _mask(self) -> int:
        if self.mask & EPOLLET:
            return EDGE_MASK
        return LEVEL_READ if not self.ending else PARKED


class FaultyChargen(FaultyService):
    """chargen: the pattern, generated into the shaper a chunk at a time."""

    __slots__ = ("start_at",)
    SERVICE = "chargen"
    INITIAL_MASK = LEVEL_READ | EPOLLOUT

    def attach(self, plan: FaultPlan, now: float) -> None:
        """The echo's faults, but `delay` (plus jitter) delays the start, once."""
        super().attach(plan, now)
        self.start_at, self.shaper = stream_start(plan, self.opened_at, now)

    def on_event(self, ev: int) -> int:
        if ev & EPOLLHUP_ERR:
            return self._on_hangup()
        if ev & EPOLLIN and not self.eof and not self.ending:
            go_on = self._drop_input()
            if go_on < 0:
                return CLOSE
            if not go_on:  # the client's FIN does not stop the stream (nc sends one)
                self.eof = True
                self.reason = "eof"
        return self._advance(self._now)

    def _advance(self, now: float) -> int:
        """Generate, shape and send, within SEND_ROUNDS chunks; end at the byte limit."""
        shaper, plan, sock = self.shaper, self.plan, self.sock
        assert shaper is not None
        assert plan is not None
        for _ in range(SEND_ROUNDS):
            if not self.out:
                if (
                    not shaper.queued
                    and not shaper.exhausted
                    and not self.ending
                    and now >= self.start_at
                ):
                    start = self.generated % CYCLE_BYTES
                    self.generated += shaper.push(WINDOW[start : start + CHUNK], now)
                if shaper.queued:
                    data, held = shaper.release(now)
                    if held:
                        plan.count("bandwidth")
                    if data is not None:
                        self.out = data
                if not self.out:
                    break
            try:
                sent = sock.send(self.out)
            except BlockingIOError:
                sent = 0
            except OSError as e:
                return self._fail(e)
            del self.out[:sent]  # type: ignore[union-attr]  # a bytearray from the shaper
            if self.out:
                break  # the socket is full: EPOLLOUT says when to go on
        if not self.pending():
            if self.ending:
                return self._end(self.ending, now)
            if shaper.exhausted:
                self.ending = self._limit_kind()
                return self._end(self.ending, now)
        if now < self.start_at:
            self._wake_at(self.start_at)
        elif shaper.queued and not self.out:
            self._wake_at(shaper.wake_at(now))
        elif not self.out and not self.ending:  # more right away, after the others' turn
            self.shared.reschedule((self.fd, EPOLLOUT))
        return self._mask()

    def _mask(self) -> int:
        if self.mask & EPOLLET:
            return EDGE_MASK
        mask = (0 if self.eof or self.ending else LEVEL_READ) | (EPOLLOUT if self.out else 0)
        return mask or PARKED

    def handoff_state(self, out: StateWriter) -> dict[str, Any]:
        record = super().handoff_state(out)
        record["start_at"] = self.start_at
        return record

    def resume(self, plan: FaultPlan, record: dict[str, Any], now: float) -> None:
        super().resume(plan, record, now)
        self.start_at = float(record.get("start_at") or 0.0)


def stream_start(plan: FaultPlan, opened_at: float, now: float) -> tuple[float, Shaper]:
    """chargen's start (opened_at plus delay and jitter, once) and its Shaper, which then
    only shapes and caps: plain here, over TLS in faults/tls_services.py."""
    faults = plan.faults
    start_at = opened_at + faults.delay_s + faults.jitter_s * plan.random()
    if faults.delay_s or faults.jitter_s:
        plan.count("delay")
    shaper = Shaper(dataclasses.replace(faults, delay_s=0.0, jitter_s=0.0), now, plan.random)
    return start_at, shaper


class FaultyInfo(FaultyService):
    """info: the line through the shaper (delayed, or cut at the byte limit), then FIN."""

    __slots__ = ()
    SERVICE = "info"
    INITIAL_MASK = EPOLLOUT

    def start_line(self, line: bytes) -> None:
        shaper, plan = self.shaper, self.plan
        assert shaper is not None
        assert plan is not None
        self.reading = False
        self.generated = shaper.push(line, plan.reactor.now)
        if shaper.delays:
            plan.count("delay")

    def on_event(self, ev: int) -> int:
        if ev & EPOLLHUP_ERR:
            return self._on_hangup()
        return self._advance(self._now)

    def _advance(self, now: float) -> int:
        shaper = self.shaper
        assert shaper is not None
        if self.ending and not self.out:
            return self._end(self.ending, now)
        if shaper.queued and not self.out:
            data, _ = shaper.release(now)
            if data is not None:
                self.out = data
        if self.out:
            try:
                sent = self.sock.send(self.out)
            except BlockingIOError:
                sent = 0
            except OSError as e:
                return self._fail(e)
            del self.out[:sent]  # type: ignore[union-attr]  # a bytearray from the shaper
        if not self.pending():
            if shaper.exhausted:  # cut at (or ending exactly at) the byte limit
                self.ending = self._limit_kind()
                return self._end(self.ending, now)
            self.reason = self.reason or "eof"
            return self._shut_write()  # the whole line: FIN, as without faults
        if shaper.queued and not self.out:
            self._wake_at(shaper.wake_at(now))
        return self._mask()

    def _mask(self) -> int:
        if self.mask & EPOLLET:
            return EDGE_MASK
        return EPOLLOUT if self.out else PARKED


def _edge(cls: type[FaultyService]) -> type[FaultyService]:
    edge: type[FaultyService] = type(
        f"Edge{cls.__name__}", (cls,), {"__slots__": (), "INITIAL_MASK": EDGE_MASK}
    )
    return edge


def _lingering(cls: type[FaultyService]) -> type[FaultyService]:
    """After our FIN: discard what the client still sends until it closes (the service's
    name stays, for the counts)."""

    def mask(self: FaultyService) -> int:
        return EDGE_MASK if self.mask & EPOLLET else LEVEL_READ

    body = {
        "__slots__": (),
        "on_event": Connection._on_lingering,
        "_advance": lambda self, now: self._mask(),
        "_mask": mask,
        "CLOSING": True,
    }
    lingering: type[FaultyService] = type(f"{cls.__name__}Lingering", (cls,), body)
    return lingering


_CLASSES: Final[dict[tuple[str, bool], type[FaultyService]]] = {}
_LINGERING: Final[dict[str, type[FaultyService]]] = {}
for _cls in (FaultyDiscard, FaultyChargen, FaultyInfo):
    _LINGERING[_cls.SERVICE] = _lingering(_cls)
    _cls.LINGERING = _LINGERING[_cls.SERVICE]
    _CLASSES[_cls.SERVICE, False] = _cls
    _CLASSES[_cls.SERVICE, True] = _edge(_cls)


def open_faulty_service(
    plan: FaultPlan,
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
) -> FaultyService:
    """The connection of a service listener with faults (admission registers it, then
    sends it a first EPOLLOUT so that chargen and info start at once)."""
    conn = _CLASSES[service, edge](sock, ip, buf=buf, shared=shared, now=now, peer=peer)
    conn.attach(plan, now)
    if isinstance(conn, FaultyInfo):
        try:
            line = info.line(info.tcp_fields(sock, listener, header))
        except OSError:
            line = b""  # gone already: the first event closes it
        conn.start_line(line)
    return conn


def service_class(record: dict[str, Any]) -> type[FaultyService]:
    """The class a handed-over fault service connection resumes in."""
    service = str(record["service"])
    if record.get("closing"):
        return _LINGERING[service]
    return _CLASSES[service, bool(record["edge"])]
