"""A worker slot's state table and the handoff round's account, without processes: the
supervisor's real-process behaviour is in test_workers*.py.

EXPECTED is the specification, written out again on purpose: a change to slot.TRANSITIONS
has to change it too.
"""

from __future__ import annotations

import itertools
import signal

import pytest

from epolld import handoff
from epolld.systemd import Notifier
from epolld.workers.round import HANDOFF_WAIT_S, HandoffRound
from epolld.workers.slot import (
    AWAITING_ANSWER,
    SAID_READY,
    TRANSITIONS,
    Event,
    IllegalTransition,
    Slot,
    State,
)

S, E = State, Event
PROCESS_STATES = [s for s in State if s not in (S.EMPTY, S.WAITING)]
EXPECTED: dict[tuple[State, Event], State] = {
    (S.EMPTY, E.FORK): S.STARTING,
    (S.EMPTY, E.BACK_OFF): S.WAITING,
    (S.WAITING, E.FORK): S.STARTING,
    (S.WAITING, E.CANCEL): S.EMPTY,
    (S.STARTING, E.READY): S.SERVING,
    (S.STARTING, E.ASK): S.ASKED_STARTING,
    (S.STARTING, E.TERMINATE): S.STOPPING,
    (S.STARTING, E.KILL): S.KILLED,
    (S.SERVING, E.ASK): S.HANDING_OVER,
    (S.SERVING, E.HAND_OVER): S.HANDED_OVER,
    (S.SERVING, E.TERMINATE): S.STOPPING,
    (S.SERVING, E.KILL): S.KILLED,
    (S.ASKED_STARTING, E.READY): S.HANDING_OVER,
    (S.ASKED_STARTING, E.GIVE_UP): S.STARTING,
    (S.HANDING_OVER, E.HAND_OVER): S.HANDED_OVER,
    (S.HANDING_OVER, E.GIVE_UP): S.SERVING,
    (S.HANDED_OVER, E.KILL): S.HANDED_OVER,
    (S.STOPPING, E.READY): S.STOPPING,
    (S.STOPPING, E.HAND_OVER): S.HANDED_OVER,
    (S.STOPPING, E.KILL): S.KILLED,
    (S.KILLED, E.READY): S.KILLED,
    (S.KILLED, E.HAND_OVER): S.HANDED_OVER,
    **{(state, E.EXIT): S.EMPTY for state in PROCESS_STATES},
}


def _slot(state: State) -> Slot:
    slot = Slot(1, [])
    slot.state = state
    return slot


@pytest.mark.parametrize(
    ("state", "event"),
    list(itertools.product(State, Event)),
    ids=lambda x: x.value,
)
def test_every_state_and_event(state: State, event: Event) -> None:
    """Each (state, event) pair moves to the specified state, or raises and leaves the slot
    as it was when the pair is not allowed."""
    slot = _slot(state)
    expected = EXPECTED.get((state, event))
    assert slot.allows(event) is (expected is not None)
    if expected is None:
        with pytest.raises(IllegalTransition, match=f"{event.value} in state {state.value}"):
            slot.apply(event)
        assert slot.state is state
    else:
        assert slot.apply(event) is expected
        assert slot.state is expected


def test_the_table_is_the_specification() -> None:
    """slot.TRANSITIONS holds exactly the specified pairs, nothing more."""
    assert TRANSITIONS == EXPECTED


@pytest.mark.parametrize(
    ("events", "states"),
    [
        pytest.param(
            [E.FORK, E.READY, E.TERMINATE, E.EXIT],
            [S.STARTING, S.SERVING, S.STOPPING, S.EMPTY],
            id="start-serve-stop",
        ),
        pytest.param(
            [E.FORK, E.READY, E.EXIT, E.BACK_OFF, E.FORK],
            [S.STARTING, S.SERVING, S.EMPTY, S.WAITING, S.STARTING],
            id="died-and-respawned",
        ),
        pytest.param(
            [E.FORK, E.EXIT, E.BACK_OFF, E.CANCEL],
            [S.STARTING, S.EMPTY, S.WAITING, S.EMPTY],
            id="back-off-cancelled-by-a-stop-or-a-round",
        ),
        pytest.param(
            [E.FORK, E.READY, E.KILL, E.EXIT],
            [S.STARTING, S.SERVING, S.KILLED, S.EMPTY],
            id="unresponsive",
        ),
        pytest.param(
            [E.FORK, E.READY, E.ASK, E.HAND_OVER, E.EXIT, E.FORK],
            [S.STARTING, S.SERVING, S.HANDING_OVER, S.HANDED_OVER, S.EMPTY, S.STARTING],
            id="handed-over-then-given-back",
        ),
        pytest.param(
            [E.FORK, E.ASK, E.READY, E.HAND_OVER],
            [S.STARTING, S.ASKED_STARTING, S.HANDING_OVER, S.HANDED_OVER],
            id="asked-while-starting",
        ),
        pytest.param(
            [E.FORK, E.ASK, E.GIVE_UP, E.READY],
            [S.STARTING, S.ASKED_STARTING, S.STARTING, S.SERVING],
            id="round-gave-up-before-its-ready",
        ),
        pytest.param(
            [E.FORK, E.READY, E.ASK, E.GIVE_UP, E.HAND_OVER, E.KILL, E.EXIT],
            [
                S.STARTING,
                S.SERVING,
                S.HANDING_OVER,
                S.SERVING,
                S.HANDED_OVER,
                S.HANDED_OVER,
                S.EMPTY,
            ],
            id="late-handover-killed-at-the-deadline",
        ),
        pytest.param(
            [E.FORK, E.READY, E.KILL, E.HAND_OVER, E.EXIT],
            [S.STARTING, S.SERVING, S.KILLED, S.HANDED_OVER, S.EMPTY],
            id="handover-read-after-the-kill",
        ),
        pytest.param(
            [E.FORK, E.TERMINATE, E.READY, E.EXIT],
            [S.STARTING, S.STOPPING, S.STOPPING, S.EMPTY],
            id="partial-handoff-stops-a-starting-worker",
        ),
    ],
)
def test_lifecycles(events: list[Event], states: list[State]) -> None:
    """A slot goes through each life the supervisor gives it, one state per event."""
    slot = Slot(1, [])
    assert slot.state is S.EMPTY
    assert [slot.apply(event) for event in events] == states


def test_every_state_is_reachable_and_none_is_a_dead_end() -> None:
    """From EMPTY every state can be reached, and from every state EMPTY again."""

    def reachable(start: State) -> set[State]:
        seen, todo = {start}, [start]
        while todo:
            state = todo.pop()
            for (source, _), target in TRANSITIONS.items():
                if source is state and target not in seen:
                    seen.add(target)
                    todo.append(target)
        return seen

    assert reachable(S.EMPTY) == set(State)
    for state in State:
        assert S.EMPTY in reachable(state), state


def test_state_sets() -> None:
    """Only EMPTY and WAITING have no process; a round awaits only the asked; READY=1 waits
    for states a worker reaches only after its ready."""
    assert [s for s in State if not s.has_process] == [S.EMPTY, S.WAITING]
    assert {target for (_, e), target in TRANSITIONS.items() if e is E.ASK} == AWAITING_ANSWER
    assert {S.SERVING, S.HANDING_OVER, S.HANDED_OVER} == SAID_READY


def _round(states: list[State], *, systemd: bool) -> HandoffRound:
    slots = [_slot(state) for state in states]
    for index, slot in enumerate(slots, 1):
        slot.index = index
    destination: handoff.Destination = (
        handoff.FdStore(Notifier(environ={}), 1.0) if systemd else handoff.Reexec()
    )
    return HandoffRound(destination, 0.0, slots)


def test_round_asks_the_starting_and_the_serving_whose_link_takes_it() -> None:
    """A round asks workers that start or serve, waits for those its request reached, and
    leaves a killed or a stopping one alone."""
    round_ = _round([S.SERVING, S.STARTING, S.SERVING, S.KILLED, S.WAITING], systemd=False)
    round_.ask(lambda slot: slot.index != 3)  # slot 3's link does not take the request
    assert [s.index for s in round_.asked] == [1, 2]
    assert [s.state for s in round_.slots] == [
        S.HANDING_OVER,
        S.ASKED_STARTING,
        S.SERVING,
        S.KILLED,
        S.WAITING,
    ]
    assert round_.waiting == round_.asked
    assert not round_.over


def test_round_is_over_once_answered_and_the_handed_over_exited() -> None:
    """The round ends when nobody is awaited and no worker that handed over still lives;
    without systemd a failure blocks it, under systemd it does not."""
    for systemd in (False, True):
        round_ = _round([S.SERVING, S.SERVING], systemd=systemd)
        round_.ask(lambda slot: True)
        first, second = round_.slots
        first.apply(E.HAND_OVER)
        round_.fail(second, "stopping already")
        assert second.state is S.SERVING
        assert round_.failed == {2: "stopping already"}
        assert not round_.waiting
        assert not round_.over  # the first one has yet to exit
        first.apply(E.EXIT)
        assert round_.over
        blocked = round_.blocked()
        assert blocked == (None if systemd else "workers [2] could not hand over")


def test_round_deadline_gives_up_and_names_the_handed_over_to_kill() -> None:
    """At the deadline every worker still awaited has failed (back to where it was before
    it was asked), and the ones that handed over and live are returned to be killed."""
    round_ = _round([S.SERVING, S.STARTING, S.SERVING], systemd=True)
    round_.ask(lambda slot: True)
    round_.slots[2].apply(E.HAND_OVER)
    assert round_.expire() == [round_.slots[2]]
    assert [s.state for s in round_.slots] == [S.SERVING, S.STARTING, S.HANDED_OVER]
    assert round_.failed == {i: f"no answer in {HANDOFF_WAIT_S} s" for i in (1, 2)}


def test_round_keeps_the_first_stop_and_the_last_signal() -> None:
    """A stop during a round is kept for its end; only the first one is news."""
    round_ = _round([S.SERVING], systemd=True)
    assert round_.defer_stop(signal.SIGTERM) is True
    assert round_.defer_stop(signal.SIGINT) is False
    assert round_.stop_signal == signal.SIGINT
