"""A restart handoff round in the supervisor (SIGUSR2): which workers were asked for their
connections, who has yet to answer, who failed, its deadline, a stop that came during it,
and what its end means. The supervisor signals and reaps; the round keeps the account.

A worker answers with its transport (handed_over) or with handoff_failed; one that exits
without handing over fails too. The round is over when nobody it asked is still awaited
(slot.AWAITING_ANSWER) and every worker that handed over has exited: its descriptors are
then only ours. At HANDOFF_WAIT_S it gives up on those still awaited; a worker that
answers later is kept (slot: the late handover).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from epolld import handoff
from epolld.core.loop import Timer
from epolld.listening.listener_set import ListenerSet
from epolld.workers import handoff as handoff_workers
from epolld.workers.slot import AWAITING_ANSWER, Event, Slot, State

log = structlog.get_logger("epolld")

HANDOFF_WAIT_S = 10.0  # for every worker to hand over and exit


@dataclass(eq=False)
class HandoffRound:
    """A restart handoff in progress over slots (every slot of the supervisor)."""

    destination: handoff.Destination
    signal_at: float
    slots: list[Slot]
    asked: list[Slot] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)  # slot index -> why
    timer: Timer | None = None
    stop_signal: int | None = None  # a stop that came during the round, for its end

    def ask(self, send: Callable[[Slot], bool]) -> None:
        """Ask every worker that is starting or serving (send: the request down its link).
        One whose link does not take the request is not waited for."""
        for slot in self.slots:
            if slot.state in (State.STARTING, State.SERVING) and send(slot):
                slot.apply(Event.ASK)
                self.asked.append(slot)

    @property
    def waiting(self) -> list[Slot]:
        """The workers asked that have neither answered nor exited."""
        return [slot for slot in self.asked if slot.state in AWAITING_ANSWER]

    def fail(self, slot: Slot, error: str) -> None:
        """slot's worker cannot hand over (it said so, exited, or is late)."""
        if slot.state in AWAITING_ANSWER:
            slot.apply(Event.GIVE_UP)
        self.failed[slot.index] = error
        log.error("worker_handoff_failed", worker=slot.index, error=error)

    def expire(self) -> list[Slot]:
        """The deadline: give up on every worker still awaited. Returns the workers that
        handed over and are still alive (to be killed: their descriptors are ours)."""
        self.timer = None
        for slot in self.waiting:
            self.fail(slot, f"no answer in {HANDOFF_WAIT_S} s")
        return [slot for slot in self.slots if slot.state is State.HANDED_OVER]

    def defer_stop(self, signum: int) -> bool:
        """Keep a stop for the round's end. True for the first one."""
        first = self.stop_signal is None
        self.stop_signal = signum
        return first

    @property
    def over(self) -> bool:
        """Every worker answered, and those that handed over have exited."""
        return not self.waiting and not any(s.state is State.HANDED_OVER for s in self.slots)

    def blocked(self) -> str | None:
        """Why the handoff cannot go ahead once over: without systemd, workers that could
        not hand over (under systemd they drain while the rest goes ahead)."""
        if self.failed and not isinstance(self.destination, handoff.FdStore):
            return f"workers {sorted(self.failed)} could not hand over"
        return None

    def end(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def send_state(
        self,
        sockets: ListenerSet,
        sources: list[handoff.HandoffSource],
        meta: dict[str, Any],
    ) -> None:
        """Write the supervisor's state (every listening socket, each transport held,
        sources' records) and send it with every descriptor to the destination.

        Raises:
            HandoffError: it could not be sent; the descriptors are still ours.
        """
        steps = {"workers": round(handoff.now_monotonic() - self.signal_at, 4)}
        out = handoff.StateWriter(systemd_keeps_inherited=self.destination.keeps_inherited)
        handoff_workers.write_records(out, self.slots, sockets)
        for source in sources:
            out.add(source.handoff_state(out))
        handoff.send(out, meta, self.destination, steps)
