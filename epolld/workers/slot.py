"""A worker slot: one place for a worker process, its listeners, and where its process is
in its life, as one state and a table of the transitions between states.

Every change of state goes through `Slot.apply(event)`, which looks the pair up in
TRANSITIONS and raises IllegalTransition for a pair that is not there (a bug): the
supervisor never re-derives a slot's state from its other fields. What is not state (the
pid, the link, times, quick deaths in a row, the last report, a held handoff transport)
is data. docs/architecture.md draws the table.

A worker asked for its connections while still starting answers after its ready (the
order on its socketpair), so ASKED_STARTING remembers that it has not said it is ready
yet, and a round that gives up on it returns it to STARTING, not SERVING. A signal that
changes nothing the supervisor waits for (SIGKILL at the drain's deadline, a second
Ctrl-C's SIGINT) is no event.
"""

from __future__ import annotations

import contextlib
import enum
import os
from dataclasses import dataclass, field
from typing import Any

from epolld.core.counters import Counters
from epolld.core.loop import Timer
from epolld.listening.sockets import Listener
from epolld.workers.link import WorkerLink


class State(enum.Enum):
    """Where a slot's process is in its life."""

    EMPTY = "empty"  # no process, none scheduled (at first, and during a round or a stop)
    WAITING = "waiting"  # no process; a respawn timer runs (the back-off)
    STARTING = "starting"  # forked; it has not said it is ready
    SERVING = "serving"  # ready: accepting and echoing
    ASKED_STARTING = "asked_starting"  # asked for its connections before it was ready
    HANDING_OVER = "handing_over"  # asked for its connections; its answer is awaited
    HANDED_OVER = "handed_over"  # its transport is held here; the process is exiting
    STOPPING = "stopping"  # sent SIGTERM: draining
    KILLED = "killed"  # SIGKILLed as unresponsive; its exit is a failure

    @property
    def has_process(self) -> bool:
        return self not in (State.EMPTY, State.WAITING)


class Event(enum.Enum):
    """What happens to a slot: the supervisor's acts and the worker's messages."""

    FORK = "fork"  # a worker process was forked
    BACK_OFF = "back_off"  # a respawn timer was set
    CANCEL = "cancel"  # the respawn timer was cancelled (a stop, a handoff)
    READY = "ready"  # the worker said it is ready
    ASK = "ask"  # a handoff round asked it for its connections
    GIVE_UP = "give_up"  # the round stopped waiting: it failed, or did not answer in time
    HAND_OVER = "hand_over"  # its transport arrived (in its round, or late)
    TERMINATE = "terminate"  # sent SIGTERM: drain and exit
    KILL = "kill"  # sent SIGKILL for silence
    EXIT = "exit"  # the process was reaped


S, E = State, Event
TRANSITIONS: dict[tuple[State, Event], State] = {
    (S.EMPTY, E.FORK): S.STARTING,
    (S.EMPTY, E.BACK_OFF): S.WAITING,
    (S.WAITING, E.FORK): S.STARTING,
    (S.WAITING, E.CANCEL): S.EMPTY,
    (S.STARTING, E.READY): S.SERVING,
    (S.STARTING, E.ASK): S.ASKED_STARTING,
    (S.STARTING, E.TERMINATE): S.STOPPING,  # a partial handoff stops every worker left
    (S.STARTING, E.KILL): S.KILLED,
    (S.STARTING, E.EXIT): S.EMPTY,
    (S.SERVING, E.ASK): S.HANDING_OVER,
    (S.SERVING, E.HAND_OVER): S.HANDED_OVER,  # late: after its round gave up on it
    (S.SERVING, E.TERMINATE): S.STOPPING,
    (S.SERVING, E.KILL): S.KILLED,
    (S.SERVING, E.EXIT): S.EMPTY,
    (S.ASKED_STARTING, E.READY): S.HANDING_OVER,
    (S.ASKED_STARTING, E.GIVE_UP): S.STARTING,
    (S.ASKED_STARTING, E.EXIT): S.EMPTY,
    (S.HANDING_OVER, E.HAND_OVER): S.HANDED_OVER,
    (S.HANDING_OVER, E.GIVE_UP): S.SERVING,
    (S.HANDING_OVER, E.EXIT): S.EMPTY,
    # Silent after handing over: SIGKILL only hurries an exit that is a handover still.
    (S.HANDED_OVER, E.KILL): S.HANDED_OVER,
    (S.HANDED_OVER, E.EXIT): S.EMPTY,
    (S.STOPPING, E.READY): S.STOPPING,  # stopped while starting, with its handlers in place
    (S.STOPPING, E.HAND_OVER): S.HANDED_OVER,  # late, during a stop: it goes with the stop
    (S.STOPPING, E.KILL): S.KILLED,
    (S.STOPPING, E.EXIT): S.EMPTY,
    (S.KILLED, E.READY): S.KILLED,  # sent before the kill, read after it
    (S.KILLED, E.HAND_OVER): S.HANDED_OVER,  # the same: the successor takes it back
    (S.KILLED, E.EXIT): S.EMPTY,
}
del S, E

# The states whose worker has said it is ready (all of them: READY=1 goes out).
SAID_READY = frozenset({State.SERVING, State.HANDING_OVER, State.HANDED_OVER})
# The states a round waits on for an answer (the round's deadline, not the health check).
AWAITING_ANSWER = frozenset({State.ASKED_STARTING, State.HANDING_OVER})


class IllegalTransition(RuntimeError):
    """An event the slot's state does not allow: a bug in the supervisor."""


@dataclass(eq=False)
class Slot:
    """One worker's place: its listeners, and the process that serves them now."""

    index: int
    listeners: list[Listener]
    state: State = State.EMPTY
    pid: int | None = None
    link: WorkerLink[Slot] | None = None
    started_at: float = 0.0
    heard_at: float = 0.0
    failures: int = 0  # quick deaths in a row
    respawn: Timer | None = None  # while WAITING
    stats: dict[str, Any] = field(default_factory=dict)
    # What the current worker counted itself, as of its last report; zero once the
    # supervisor's retired totals hold it (the worker handed over, or exited).
    counters: Counters = field(default_factory=Counters)
    # The slot's next worker restores totals that this supervisor has not counted (a
    # restart from a release whose state did not carry the workers' totals).
    uncounted: bool = False
    # A worker's handoff transport, (FDNAME, fd): held for the slot's next worker, which
    # takes over its connections (or written into the supervisor's own handoff).
    handoff: list[tuple[str, int]] | None = None
    restored: int = 0  # connections the current worker took over at its start

    def allows(self, event: Event) -> bool:
        """Whether event fits the state (a worker's message may come at any time)."""
        return (self.state, event) in TRANSITIONS

    def apply(self, event: Event) -> State:
        """Move to the state TRANSITIONS gives for (state, event) and return it.

        Raises:
            IllegalTransition: the table has no such pair.
        """
        try:
            self.state = TRANSITIONS[self.state, event]
        except KeyError:
            raise IllegalTransition(
                f"worker slot {self.index}: {event.value} in state {self.state.value}"
            ) from None
        return self.state

    def drop_handoff(self) -> None:
        for _, fd in self.handoff or ():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.handoff = None
