"""A TCP connection of a listener with `faults:`: its echo delayed, rate-limited, cut short.

Chosen at accept time (service/admission.py), so that a connection of a listener without
faults keeps the plain classes of tcp/connection.py and pays nothing per event. Both
trigger modes are one class here (a fault listener is a test tool, not a hot path); it
copies whatever `io:` says (splice would move bytes past the delay queue).

Everything read goes through a Shaper (shaper.py): delayed chunks wait there, then move to
the pending output and are sent. Both count against high_water, so a fast writer to a
delay listener stops being read, as it would with a slow reader. A timer per connection
(the reactor's call_later) wakes it when the next chunk is due or the bucket has refilled.

close_after_bytes / reset_after_bytes: the Shaper takes N bytes, then refuses the rest
(read and dropped); once those N have been handed to the kernel, a FIN (shutdown, then the
lingering close of tcp/connection.py) or an RST. An RST would throw away what still
waits in the send queue, so it waits for SIOCOUTQ (bytes sent but not yet acknowledged,
tcp(7)) to reach 0, polling, then closes with SO_LINGER 0. close_after / reset_after:
the same at that time after accept, dropping whatever waited.
"""

from __future__ import annotations

import dataclasses
import random
import socket
import time
from typing import TYPE_CHECKING, Any, ClassVar

from epolld.config import Faults
from epolld.core.loop import CLOSE, Reactor
from epolld.faults.timers import FAULT_SLOTS, PARKED, FaultTimers
from epolld.tcp.connection import (
    EDGE_MASK,
    EDGE_READS_PER_EVENT,
    EPOLLET,
    EPOLLHUP_ERR,
    EPOLLIN,
    EPOLLOUT,
    EPOLLRDHUP,
    LEVEL_READ,
    NO_OUTPUT,
    Connection,
    SharedSettings,
)

if TYPE_CHECKING:
    from epolld.handoff import StateWriter


class FaultPlan:
    """What the connections of one listener's faults share: the faults, the reactor (timers,
    masks), the counts by kind (Counters.faults), the random source. Open connections keep
    the plan they were accepted with; a reload makes new plans for new connections."""

    __slots__ = ("counts", "faults", "random", "reactor")

    def __init__(
        self, faults: Faults, reactor: Reactor, counts: dict[str, int], rand: random.Random
    ) -> None:
        self.faults = faults
        self.reactor = reactor
        self.counts = counts
        self.random = rand.random

    def count(self, kind: str, n: int = 1) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + n

    def open(
        self,
        sock: socket.socket,
        ip: str,
        *,
        buf: memoryview,
        shared: SharedSettings,
        now: float,
        peer: str | None,
        edge: bool,
    ) -> FaultyConnection:
        cls = EdgeFaultyConnection if edge else FaultyConnection
        conn = cls(sock, ip, buf=buf, shared=shared, now=now, peer=peer)
        conn.attach(self, now)
        return conn


def fault_class(edge: bool) -> type[FaultyConnection]:
    return EdgeFaultyConnection if edge else FaultyConnection


class FaultyConnection(FaultTimers, Connection):
    """One client of a fault listener, level-triggered (EdgeFaultyConnection: edge)."""

    __slots__ = FAULT_SLOTS
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
        super().__init__(sock, ip, buf=buf, shared=shared, now=now, peer=peer)
        self._init_faults()  # ending: "close", "reset" or "drain" once decided

    def attach(self, plan: FaultPlan, now: float) -> None:
        """Start the faults: the Shaper, and the deadline of close_after / reset_after
        (after a byte limit of 0: at once)."""
        self._start_faults(plan, now, limit_at_once=True)

    # -- events ------------------------------------------------------------------------

    def on_event(self, ev: int) -> int:
        if ev & EPOLLHUP_ERR:
            return self._on_hangup()
        plan = self.plan
        assert plan is not None
        assert self.shaper is not None
        # The clock now, not the turn's: a delay counts from the read, which may come late
        # in a turn (after a TLS handshake's work, say), never from before it.
        now = time.monotonic()
        if ev & EPOLLIN and self.reading:
            edge = self.mask & EPOLLET
            high_water = self.shared.high_water
            sock, buf, shaper = self.sock, self.buf, self.shaper
            for _ in range(EDGE_READS_PER_EVENT if edge else 1):
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
                taken = shaper.push(buf[:n], now)
                if taken < n:  # past close_after_bytes / reset_after_bytes: never sent
                    self.dropped += n - taken
                elif shaper.delays:
                    plan.count("delay")
                if self.pending() >= high_water:
                    self.reading = False
                    break
            else:
                if edge:  # the budget ran out before EAGAIN: no new edge will say so
                    self.shared.reschedule((self.fd, EPOLLIN | EPOLLRDHUP))
        return self._advance(now)

    def _advance(self, now: float) -> int:
        """Release what is due, send, resume reading, end when the time has come."""
        shaper = self.shaper
        assert shaper is not None
        assert self.plan is not None
        if shaper.queued:
            data, held = shaper.release(now)
            if data is not None:
                if self.out:
                    self.out += data
                else:
                    self.out = data
            if held:
                self.plan.count("bandwidth")
        if self.out:
            try:
                sent = self.sock.send(self.out)
            except BlockingIOError:
                sent = 0
            except OSError as e:
                return self._fail(e)
            del self.out[:sent]  # type: ignore[union-attr]  # non-empty: a bytearray
        if (
            not self.reading
            and not self.eof
            and not self.ending
            and self.pending() <= self.shared.low_water
        ):
            self.reading = True
            if self.mask & EPOLLET:  # what arrived while paused raises no new edge
                self.shared.reschedule((self.fd, EPOLLIN | EPOLLRDHUP))
        if not self.pending():
            if self.ending:
                return self._end(self.ending, now)
            if shaper.exhausted:
                self.ending = self._limit_kind()
                return self._end(self.ending, now)
            if self.eof:
                return CLOSE
        elif shaper.queued and not self.out:
            self._wake_at(shaper.wake_at(now))
        return self._mask()

    def _mask(self) -> int:
        if self.mask & EPOLLET:
            return EDGE_MASK
        if self.out:
            return LEVEL_READ | EPOLLOUT if self.reading else EPOLLOUT
        return LEVEL_READ if self.reading else PARKED

    def _on_timer(self) -> None:
        self.timer = None
        self._from_timer(lambda now: self._advance(now))

    def _on_deadline(self, kind: str) -> None:
        self.deadline = None
        if self.ending in ("close", "reset"):
            return
        # Whatever waits is dropped: the time is up.
        self.ending = kind
        self.reading = False
        self.discard_pending()
        self._from_timer(lambda now: self._end(kind, now))

    def _from_timer(self, step: Any) -> None:
        """Run step(now) outside an event and apply the mask it returns."""
        if self.sock.fileno() < 0:  # closed, or let go after a handoff
            return
        reactor = self.plan.reactor  # type: ignore[union-attr]
        self.active_at = reactor.now
        try:
            mask = step(reactor.now)
        except OSError as e:
            mask = self._fail(e)
        reactor.set_mask(self, mask)

    # -- the end: FIN, RST, or a graceful stop ---------------------------------------

    def _end(self, kind: str, now: float) -> int:
        plan = self.plan
        assert plan is not None
        if kind == "reset":
            return self._reset(now)
        # "close" and "drain": a FIN after what was sent, then discard until the peer closes.
        if kind == "close":
            plan.count("close")
            self.reason = "fault_close"
        self.discard_pending()
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
        return self._shut_write()

    def _reset(self, now: float) -> int:
        """An RST once the peer has acknowledged everything sent (SIOCOUTQ 0)."""
        self.reading = False
        self.discard_pending()
        return self._reset_once_acked(now, EDGE_MASK if self.mask & EPOLLET else PARKED)

    def begin_shutdown(self) -> int:
        """A graceful stop: read no more, let what waits go out (the delays still apply,
        within shutdown_timeout), then FIN."""
        self.reason = self.reason or "shutdown"
        if self.ending in ("close", "reset"):
            return self.mask
        self.ending = "drain"
        self.reading = False
        assert self.plan is not None
        return self._advance(self.plan.reactor.now)

    # -- handoff -----------------------------------------------------------------------

    def handoff_state(self, out: StateWriter) -> dict[str, Any]:
        """A connection record whose pending output includes the delayed chunks, with the
        faults it keeps and how many of those bytes were delayed (they wait again)."""
        assert self.plan is not None
        assert self.shaper is not None
        held = self.out
        delayed = self.shaper.take_all()
        self.out = bytes(held) + delayed if delayed else held
        try:
            record = super().handoff_state(out)
        finally:
            self.out = held
        record["faults"] = dataclasses.asdict(self.plan.faults)
        record["delayed"] = len(delayed)
        record["limit_left"] = self.shaper.limit_left
        record["ending"] = self.ending
        return record

    def resume(self, plan: FaultPlan, record: dict[str, Any], now: float) -> None:
        """After from_handoff(): the faults again; the delayed bytes wait once more and
        the bucket starts full."""
        self.attach(plan, now)
        assert self.shaper is not None
        delayed = int(record.get("delayed") or 0)
        if delayed and self.out:
            tail = bytes(self.out[-delayed:])
            del self.out[-delayed:]  # type: ignore[union-attr]  # restored as a bytearray
            if not self.out:
                self.out = NO_OUTPUT
            limit = self.shaper.limit_left
            self.shaper.limit_left = None
            self.shaper.push(tail, now)
            self.shaper.limit_left = limit
        if record.get("limit_left") is not None:
            self.shaper.limit_left = int(record["limit_left"])
        self.ending = str(record.get("ending") or "")
        self.mask = EDGE_MASK if self.INITIAL_MASK & EPOLLET else self._mask()
        if self.out and not self.mask & EPOLLOUT:
            self.mask |= EPOLLOUT
        self._wake_at(now)  # one look at once: sends, arms the next release


class EdgeFaultyConnection(FaultyConnection):
    """Edge-triggered: registered once with EDGE_MASK."""

    __slots__ = ()
    INITIAL_MASK = EDGE_MASK


class LingeringFaultyConnection(FaultyConnection):
    """After a fault's FIN: discard what the peer still sends until it closes."""

    __slots__ = ()
    on_event = Connection._on_lingering


FaultyConnection.LINGERING = LingeringFaultyConnection
