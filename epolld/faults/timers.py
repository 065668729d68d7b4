"""What a fault connection keeps besides its echo, plain or TLS alike: the plan, the shaper,
the release timer, the close_after / reset_after deadline, and the RST that waits until
the peer has acknowledged what it was sent.

FaultTimers is a mixin of FaultyConnection (faults/connection.py) and FaultyTlsConnection
(faults/tls.py); each declares the slots, since a mixin's own slots would clash with the
connection's layout. Its calls to super() reach the connection class it is mixed into.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Protocol

from epolld.config import Faults
from epolld.core.loop import CLOSE, Reactor, Timer
from epolld.faults.shaper import Shaper
from epolld.tcp.connection import EPOLLET, EPOLLRDHUP, Connection
from epolld.tcp.reset import reset_on_close, unacked_bytes

if TYPE_CHECKING:
    _Base = Connection  # what the mixin is mixed into, for the type checker's super()
else:
    _Base = object

FAULT_SLOTS: Final = ("_reset_since", "deadline", "ending", "plan", "shaper", "timer")
RESET_POLL_S: Final = 0.005  # how often to look at the send queue before an RST
RESET_WAIT_MAX_S: Final = 10.0  # a peer that acknowledges nothing gets its RST anyway
# A level-triggered connection that waits only for its timer (reading paused or over, and
# nothing to send) must still be registered with some mask: edge-triggered RDHUP reports
# at most once (HUP and ERR are reported whatever the mask).
PARKED: Final = EPOLLRDHUP | EPOLLET


class Plan(Protocol):
    """What the connections of one listener's faults share (connection.py's FaultPlan)."""

    faults: Faults
    reactor: Reactor
    random: Callable[[], float]

    def count(self, kind: str, n: int = 1) -> None: ...


class FaultTimers(_Base):
    """The fault state of one connection; _init_faults() in the constructor, attach() at
    accept (or resume() after a handoff)."""

    if TYPE_CHECKING:
        __slots__ = FAULT_SLOTS  # what the classes it is mixed into declare
    else:
        __slots__ = ()
    plan: Plan | None
    shaper: Shaper | None
    timer: Timer | None  # the next release, or the next look before an RST
    deadline: Timer | None  # close_after / reset_after
    ending: str  # how it ends once decided: "close", "reset", ...
    _reset_since: float

    def _init_faults(self) -> None:
        self.plan = None  # set by attach()
        self.shaper = None
        self.timer = None
        self.deadline = None
        self.ending = ""
        self._reset_since = 0.0

    def _start_faults(self, plan: Plan, now: float, limit_at_once: bool) -> None:
        """The Shaper, and the deadline of close_after / reset_after (at once for a byte
        limit of 0 when limit_at_once)."""
        self.plan = plan
        self.shaper = Shaper(plan.faults, now, plan.random)
        faults = plan.faults
        timed = [
            (after, kind)
            for after, kind in ((faults.reset_after_s, "reset"), (faults.close_after_s, "close"))
            if after is not None
        ]
        if limit_at_once and self.shaper.exhausted:
            timed.append((0.0, self._limit_kind()))
        if timed:
            after, kind = min(timed)
            delay = max(0.0, self.opened_at + after - plan.reactor.now)
            self.deadline = plan.reactor.call_later(delay, lambda: self._on_deadline(kind))

    if TYPE_CHECKING:  # each connection class has its own

        def _on_deadline(self, kind: str) -> None: ...

        def _on_timer(self) -> None: ...

    def _limit_kind(self) -> str:
        """How a byte limit ends the connection: the smaller of the two, reset on a tie."""
        faults = self.plan.faults  # type: ignore[union-attr]
        if faults.reset_after_bytes is None:
            return "close"
        if faults.close_after_bytes is None or faults.reset_after_bytes <= faults.close_after_bytes:
            return "reset"
        return "close"

    # -- accounting ----------------------------------------------------------------------

    def pending(self) -> int:
        """Bytes received and not yet echoed: the pending output and the delayed chunks."""
        shaper = self.shaper
        return len(self.out) + (shaper.queued if shaper is not None else 0)

    def discard_pending(self) -> None:
        if self.shaper is not None:
            self.dropped += self.shaper.clear()
        super().discard_pending()

    def close(self) -> None:
        for timer in (self.timer, self.deadline):
            if timer is not None:
                timer.cancel()
        self.timer = self.deadline = None
        super().close()

    # -- timers and the end --------------------------------------------------------------

    def _wake_at(self, when: float | None) -> None:
        if when is None:
            return
        timer = self.timer
        if timer is not None:
            if timer.when <= when:
                return  # an earlier wakeup looks again then
            timer.cancel()
        reactor = self.plan.reactor  # type: ignore[union-attr]
        self.timer = reactor.call_later(max(0.0, when - reactor.now), self._on_timer)

    def _reset_once_acked(self, now: float, waiting: int) -> int:
        """An RST once the peer has acknowledged everything sent (SIOCOUTQ 0); until then
        the mask waiting, and a look again in RESET_POLL_S."""
        self.reading = False
        if not self._reset_since:
            self._reset_since = now
        if unacked_bytes(self.fd) and now - self._reset_since < RESET_WAIT_MAX_S:
            self._wake_at(now + RESET_POLL_S)
            return waiting
        self.plan.count("reset")  # type: ignore[union-attr]
        self.reason = "fault_reset"
        try:
            reset_on_close(self.sock)
        except OSError as e:
            return self._fail(e)
        return CLOSE
