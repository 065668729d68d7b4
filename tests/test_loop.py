"""The reactor in-process, on real socketpairs: dispatch, masks, close, timers, signals."""

from __future__ import annotations

import os
import select
import signal
import socket
import time
from collections.abc import Callable, Iterator

import pytest
from structlog.testing import capture_logs

from epolld.core.loop import CLOSE, Reactor


class Recorder:
    """A handler on one end of a socketpair that records what it was given."""

    def __init__(self, sock: socket.socket, mask: int, on_event: Callable[[int], int]) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.mask = mask
        self.active_at = 0.0
        self._on_event = on_event
        self.events: list[int] = []
        self.closed = False

    def on_event(self, events: int) -> int:
        self.events.append(events)
        return self._on_event(events)

    def close(self) -> None:
        self.closed = True
        self.sock.close()


@pytest.fixture
def reactor() -> Iterator[Reactor]:
    """A reactor that is released after the test."""
    r = Reactor()
    yield r
    r.release()


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected, non-blocking socketpair."""
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


def run_for(reactor: Reactor, seconds: float) -> None:
    """Run the reactor until a timer stops it: every test ends by itself."""
    reactor.call_later(seconds, reactor.stop)
    reactor.run()


def test_mask_change_reregisters_and_close_unregisters_before_close(
    pair: tuple[socket.socket, socket.socket], reactor: Reactor
) -> None:
    """A returned mask is applied (EPOLLOUT events follow), and CLOSE unregisters the fd
    before handler.close() runs."""
    a, b = pair
    seen_registered: list[bool] = []

    def step(ev: int) -> int:
        if ev & select.EPOLLIN:
            a.recv(100)
            return select.EPOLLOUT  # now ask for writability only
        return CLOSE

    handler = Recorder(a, select.EPOLLIN, step)
    original_close = handler.close

    def close() -> None:
        seen_registered.append(handler.fd in {h.fd for h in reactor.handlers()})
        original_close()

    handler.close = close  # type: ignore[method-assign]
    reactor.add(handler)
    b.send(b"x")
    run_for(reactor, 0.2)
    assert handler.events[0] & select.EPOLLIN
    assert handler.events[1] == select.EPOLLOUT
    assert handler.closed
    assert seen_registered == [False]
    assert len(reactor) == 0


def test_exception_in_handler_is_logged_and_closes_only_it(
    pair: tuple[socket.socket, socket.socket], reactor: Reactor
) -> None:
    """A handler that raises is logged with its traceback and closed; others go on."""
    a, b = pair
    c, d = socket.socketpair()

    def boom(ev: int) -> int:
        raise RuntimeError("bug")

    bad = Recorder(a, select.EPOLLIN, boom)
    good = Recorder(c, select.EPOLLIN, lambda ev: c.recv(100) and select.EPOLLIN)
    reactor.add(bad)
    reactor.add(good)
    b.send(b"x")
    d.send(b"y")
    with capture_logs() as logs:
        run_for(reactor, 0.2)
    d.close()
    assert bad.closed
    assert not good.closed
    assert good.events
    [entry] = [e for e in logs if e["event"] == "handler_bug"]
    assert entry["log_level"] == "error"
    assert entry.get("exc_info")


def test_call_soon_runs_after_the_whole_batch(reactor: Reactor) -> None:
    """Work queued with call_soon() runs only after every event of the batch was
    dispatched (accepting there cannot reuse an fd closed earlier in the batch)."""
    order: list[str] = []
    pairs = [socket.socketpair() for _ in range(3)]
    for i, (a, b) in enumerate(pairs):

        def step(ev: int, i: int = i, a: socket.socket = a) -> int:
            a.recv(10)
            order.append(f"event{i}")
            if i == 0:
                reactor.call_soon(lambda: order.append("soon"))
            return select.EPOLLIN

        reactor.add(Recorder(a, select.EPOLLIN, step))
        b.send(b"x")
    run_for(reactor, 0.1)
    for _a, b in pairs:
        b.close()
    assert order.index("soon") == 3, order


def test_call_soon_from_call_soon_runs_next_turn(reactor: Reactor) -> None:
    """Work that queues more work with call_soon() (closing in batches, say) gets it run on
    the following turns, not dropped."""
    turns: list[int] = []

    def again() -> None:
        turns.append(len(turns))
        if len(turns) < 5:
            reactor.call_soon(again)

    reactor.call_soon(again)
    run_for(reactor, 0.1)
    assert turns == [0, 1, 2, 3, 4]


def test_reschedule_delivers_a_synthetic_event_next_turn(
    pair: tuple[socket.socket, socket.socket], reactor: Reactor
) -> None:
    """An edge-style handler that stops early gets its synthetic event on the next turn,
    although the kernel reports nothing new."""
    a, b = pair
    budget = [3]

    def step(ev: int) -> int:
        budget[0] -= 1
        if budget[0] > 0:
            reactor.reschedule((a.fileno(), select.EPOLLIN))
        return select.EPOLLIN | select.EPOLLET

    reactor.add(Recorder(a, select.EPOLLIN | select.EPOLLET, step))
    b.send(b"one edge")
    run_for(reactor, 0.2)
    assert budget[0] == 0  # one real edge, then two synthetic events


def test_synthetic_and_kernel_events_for_one_fd_are_one_dispatch(
    pair: tuple[socket.socket, socket.socket], reactor: Reactor
) -> None:
    """A handler with a rescheduled event that also gets a new edge in the same turn is
    dispatched once with both masks merged, as level mode would dispatch it once."""
    a, b = pair
    calls: list[int] = []

    def step(ev: int) -> int:
        calls.append(ev)
        if len(calls) == 1:
            a.recv(10)
            reactor.reschedule((a.fileno(), select.EPOLLIN))  # budget used up, say
            b.send(b"more")  # and a new edge arrives before the next poll
        return select.EPOLLIN | select.EPOLLOUT | select.EPOLLET

    reactor.add(Recorder(a, select.EPOLLIN | select.EPOLLOUT | select.EPOLLET, step))
    b.send(b"x")
    reactor.call_later(0.05, reactor.stop)
    reactor.run()
    assert len(calls) == 2, calls  # the first event, then one merged dispatch
    assert calls[1] & select.EPOLLIN


def test_replace_hands_the_fd_to_a_new_handler(
    pair: tuple[socket.socket, socket.socket], reactor: Reactor
) -> None:
    """A handler that replaces itself mid-event: its return value is ignored, and the next
    events go to the new handler."""
    a, b = pair
    new = Recorder(a, select.EPOLLIN, lambda ev: a.recv(100) and select.EPOLLIN)

    def first(ev: int) -> int:
        a.recv(1)  # the header, say
        reactor.replace(old, new)
        return CLOSE  # must not close the fd the new handler now owns

    old = Recorder(a, select.EPOLLIN, first)
    reactor.add(old)
    b.send(b"h")
    reactor.call_later(0.05, lambda: b.send(b"body"))
    run_for(reactor, 0.2)
    assert not old.closed
    assert not new.closed
    assert len(old.events) == 1
    assert new.events


def test_timers_run_in_order_and_cancel(reactor: Reactor) -> None:
    """call_later() runs timers in deadline order; a cancelled timer never runs; every()
    repeats."""
    ran: list[str] = []
    reactor.call_later(0.03, lambda: ran.append("b"))
    reactor.call_later(0.01, lambda: ran.append("a"))
    reactor.call_later(0.02, lambda: ran.append("never")).cancel()
    ticks: list[float] = []
    reactor.every(lambda: 0.02, lambda: ticks.append(reactor.now))
    run_for(reactor, 0.15)
    assert ran == ["a", "b"]
    assert len(ticks) >= 3


def test_signal_runs_in_the_loop_and_handler_is_restored(reactor: Reactor) -> None:
    """A signal registered with on_signal() wakes epoll_wait() and runs its function in the
    loop; after run() the previous disposition is back."""
    got: list[int] = []
    before = signal.getsignal(signal.SIGUSR2)

    def on_usr2(signum: int) -> None:
        got.append(signum)
        reactor.stop()

    reactor.on_signal(signal.SIGUSR2, on_usr2)
    reactor.call_later(0.05, lambda: os.kill(os.getpid(), signal.SIGUSR2))
    reactor.call_later(5.0, reactor.stop)  # bound: the test ends even if the signal is lost
    reactor.run()
    assert got == [signal.SIGUSR2]
    assert signal.getsignal(signal.SIGUSR2) is before


def test_longest_turn_is_the_longest_work_between_two_polls(reactor: Reactor) -> None:
    """A timer that keeps the loop 0.15 s shows as the longest turn (the stats line's
    longest_turn_ms); quick turns before and after it do not lower the figure."""
    reactor.call_soon(lambda: None)  # a quick turn first
    reactor.call_later(0.02, lambda: time.sleep(0.15))
    run_for(reactor, 0.3)
    assert 0.15 <= reactor.longest_turn_s < 0.3
    assert reactor.longest_deferred_cpu_s < 0.05  # sleeping is no CPU


def test_slow_turns_counts_each_turn_over_100_ms(reactor: Reactor) -> None:
    """Two turns held 0.12 s count twice, though the second is shorter than the longest;
    a turn of 0.05 s does not count (the stats line's slow_turns)."""
    reactor.call_later(0.01, lambda: time.sleep(0.15))
    reactor.call_later(0.20, lambda: time.sleep(0.12))
    reactor.call_later(0.40, lambda: time.sleep(0.05))
    run_for(reactor, 0.6)
    assert reactor.slow_turns == 2


def test_longest_deferred_cpu_counts_the_work_of_timers_and_call_soon(reactor: Reactor) -> None:
    """CPU spent in a timer shows in longest_deferred_cpu_s (the stats line's
    longest_deferred_cpu_ms), a figure that waiting for the core does not inflate."""

    def spin() -> None:
        end = time.thread_time() + 0.08
        while time.thread_time() < end:
            pass

    reactor.call_later(0.02, spin)
    run_for(reactor, 0.5)
    assert 0.08 <= reactor.longest_deferred_cpu_s < 0.5
