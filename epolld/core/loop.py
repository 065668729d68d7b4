"""The reactor: select.epoll, one fd -> handler map, timers, the signal wakeup, dispatch.

It knows nothing of echo. A handler is anything with an ``fd``, the ``mask`` it is
registered with, and ``on_event(events)`` returning the next mask or CLOSE; the reactor
calls ``epoll_ctl`` only when that mask changes, and ``handler.close()`` after it has
unregistered the fd. Listeners, connections, the signal wakeup and every later kind of
descriptor plug in the same way; the hot loop has one lookup and one call per event.

Some facts about epoll that shape this file:

- HUP and ERR are reported whatever the mask asks for; a level-triggered HUP
  that is not acted on makes epoll_wait() return at once, forever. Handlers
  treat them as "read and write now" and close on the failure (selectors.py).
- After a peer's shutdown(SHUT_WR), level-triggered EPOLLIN|EPOLLRDHUP stay set:
  a connection that saw EOF stops asking for EPOLLIN, or the loop spins.
- The fd is the only key epoll gives back, and accept() reuses the lowest free
  fd number. Work that opens descriptors (accepting) therefore runs through
  call_soon(), after the whole batch is dispatched: an fd closed earlier in the
  batch cannot be handed to a new peer while events meant for the old one (a
  synthetic event queued for it, say) are still being dispatched.
- A signal handler alone does not wake epoll_wait(): PEP 475 retries the call.
  signal.set_wakeup_fd() writes the signal number to a socketpair that epoll
  watches, and the numbers are read back from it in the loop.
- Edge-triggered handlers that stop before EAGAIN (a per-event budget used up)
  get no new edge for what is left: they queue a synthetic event with
  reschedule(), and the next turn polls without waiting. A synthetic event is
  merged with the kernel's for the same fd: one dispatch per fd per turn.
- maxevents must be at least 1, and epoll's timeout is whole milliseconds:
  select.epoll.poll() rounds a float timeout up (bpo-20311), so a timer is
  never run early and the loop never wakes up just before it is due.
"""

from __future__ import annotations

import heapq
import itertools
import select
import signal
import socket
import time
from collections.abc import Callable
from typing import Final, Protocol

import structlog

log = structlog.get_logger("epolld")

CLOSE: Final = 0  # returned by on_event instead of a mask: unregister and close
MAX_EVENTS: Final = 1024  # per epoll_wait(); a larger batch only delays timers
SLOW_TURN_S: Final = 0.1  # a turn longer than this holds every connection noticeably
EPOLL_FLAG_NAMES = [
    (getattr(select, name), name)
    for name in ("EPOLLIN", "EPOLLPRI", "EPOLLOUT", "EPOLLERR", "EPOLLHUP", "EPOLLRDHUP")
]


def describe_events(ev: int) -> str:
    """Decode an epoll event mask: 0x2011 -> "EPOLLIN|EPOLLERR|EPOLLRDHUP"."""
    return "|".join(name for bit, name in EPOLL_FLAG_NAMES if ev & bit) or "0"


class Handler(Protocol):
    """What the reactor dispatches to."""

    fd: int
    mask: int  # registered with; the reactor keeps it current
    active_at: float  # the reactor's clock at this handler's last event

    def on_event(self, events: int) -> int:
        """Handle one epoll event; return the mask wanted next, or CLOSE."""
        ...

    def close(self) -> None:
        """Release the descriptor(s); the reactor has unregistered the fd already."""
        ...


class Timer:
    """A call_later() entry; cancel() makes it a no-op (it stays in the heap until due)."""

    __slots__ = ("cancelled", "fn", "when")

    def __init__(self, when: float, fn: Callable[[], None]) -> None:
        self.when = when
        self.fn = fn
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Reactor:
    """The only owner of the epoll fd: register handlers, run timers, dispatch events."""

    def __init__(self) -> None:
        self._ep = select.epoll()
        self._handlers: dict[int, Handler] = {}
        self._ready: list[tuple[int, int]] = []  # synthetic events for the next turn
        # One bound method that handlers share, rather than a reference to the reactor each.
        self.reschedule: Callable[[tuple[int, int]], None] = self._ready.append
        self._soon: list[Callable[[], None]] = []
        self._timers: list[tuple[float, int, Timer]] = []
        self._timer_seq = itertools.count()
        self._signal_fns: dict[int, Callable[[int], None]] = {}
        self._wakeup = _SignalWakeup(self._signal_fns)
        self.now = time.monotonic()
        self.trace = False  # log every event with its decoded mask
        # Events dispatched per turn at most (timers, the heartbeat among them, run between
        # turns): a worker sharing its core with many others takes fewer (worker.py).
        self.max_events = MAX_EVENTS
        self._running = False
        # The longest turn since run(): dispatch, call_soon work and timers between two polls,
        # the longest any event waited behind the loop's own work (the stats line shows it).
        self.longest_turn_s = 0.0
        self.longest_deferred_cpu_s = 0.0  # the most CPU of call_soon work and timers in a turn
        # Turns longer than SLOW_TURN_S since run(): unlike the longest, a count tells a reader
        # comparing two stats lines whether the loop was held between them.
        self.slow_turns = 0

    def __len__(self) -> int:
        return len(self._handlers)

    # -- handlers --------------------------------------------------------------------

    def add(self, handler: Handler) -> None:
        """Register handler.fd with handler.mask."""
        self._ep.register(handler.fd, handler.mask)
        self._handlers[handler.fd] = handler

    def set_mask(self, handler: Handler, mask: int) -> None:
        """Ask for another mask (epoll_ctl only if it changed); CLOSE closes the handler."""
        if not mask:
            self.close(handler)
        elif mask != handler.mask:
            self._ep.modify(handler.fd, mask)
            handler.mask = mask

    def close(self, handler: Handler) -> None:
        """Unregister, forget, then handler.close() (trio's notify_closing order)."""
        self.remove(handler)
        handler.close()

    def remove(self, handler: Handler) -> None:
        """Unregister and forget a handler; its fd stays open (paused, or handed on)."""
        if self._handlers.get(handler.fd) is handler:
            del self._handlers[handler.fd]
            self._ep.unregister(handler.fd)

    def replace(self, old: Handler, new: Handler) -> None:
        """Let new take over old's fd (a PROXY header read, say) with new.mask."""
        assert old.fd == new.fd, "replace() keeps the descriptor"
        self._handlers[new.fd] = new
        new.active_at = old.active_at
        if new.mask != old.mask:
            self._ep.modify(new.fd, new.mask)

    def handlers(self) -> list[Handler]:
        return list(self._handlers.values())

    # -- timers ----------------------------------------------------------------------

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run fn after this batch of events has been dispatched."""
        self._soon.append(fn)

    def call_later(self, delay_s: float, fn: Callable[[], None]) -> Timer:
        timer = Timer(self.now + delay_s, fn)
        heapq.heappush(self._timers, (timer.when, next(self._timer_seq), timer))
        return timer

    def every(self, interval_s: Callable[[], float], fn: Callable[[], None]) -> None:
        """Run fn every interval_s() seconds while the reactor runs; the interval is read
        anew each time, so a reload changes it without adding timers."""

        def tick() -> None:
            fn()
            self.call_later(interval_s(), tick)

        self.call_later(interval_s(), tick)

    def _run_timers(self, now: float) -> None:
        timers = self._timers
        while timers and timers[0][0] <= now:
            timer = heapq.heappop(timers)[2]
            if not timer.cancelled:
                timer.fn()

    # -- signals ---------------------------------------------------------------------

    def on_signal(self, signum: int, fn: Callable[[int], None]) -> None:
        """Call fn(signum) from the loop when signum arrives (installed by run())."""
        self._signal_fns[signum] = fn

    # -- running ---------------------------------------------------------------------

    def stop(self) -> None:
        """Return from run() after this turn."""
        self._running = False

    def run(self, started: Callable[[], None] | None = None) -> None:
        """Install the signal wakeup, call started() (signals are caught from then on:
        announce readiness there), and dispatch events until stop()."""
        self.add(self._wakeup)
        old_wakeup = signal.set_wakeup_fd(self._wakeup.write_fd, warn_on_full_buffer=False)
        old_handlers = {s: signal.signal(s, _record_only) for s in self._signal_fns}
        self._running = True
        try:
            if started is not None:
                started()
            self._dispatch_until_stopped()
        finally:
            for s, h in old_handlers.items():
                signal.signal(s, h)
            signal.set_wakeup_fd(old_wakeup)
            self.remove(self._wakeup)

    def _dispatch_until_stopped(self) -> None:
        handlers = self._handlers
        ready = self._ready
        soon = self._soon
        timers = self._timers
        poll = self._ep.poll
        modify = self._ep.modify
        monotonic = time.monotonic
        thread_time = time.thread_time
        now = self.now = monotonic()
        while self._running:
            # One clock read per turn, needed for the timeout anyway, also times the turn.
            end = monotonic()
            turn = end - now
            if turn > self.longest_turn_s:
                self.longest_turn_s = turn
            if turn > SLOW_TURN_S:
                self.slow_turns += 1
            if ready or soon:
                timeout = 0.0
            elif timers:
                timeout = max(0.0, timers[0][0] - end)
            else:
                timeout = -1.0
            events = poll(timeout, self.max_events)
            now = self.now = monotonic()
            if ready:
                events = _merge(events, ready)
                ready.clear()
            if self.trace:
                _trace_batch(events)
            for fd, ev in events:
                handler = handlers.get(fd)
                if handler is None:  # closed earlier in this batch
                    continue
                handler.active_at = now
                try:
                    mask = handler.on_event(ev)
                except Exception:
                    log.exception("handler_bug", fd=fd, handler=repr(handler))
                    mask = CLOSE
                if mask != handler.mask:
                    if handlers.get(fd) is not handler:  # it swapped or closed itself
                        continue
                    if mask:
                        modify(fd, mask)
                        handler.mask = mask
                    else:
                        self.close(handler)
            due = timers and timers[0][0] <= now
            if soon or due:
                # The loop's own deferred work (accepting, idle sweeps, close batches): its CPU
                # time, which other processes on the core cannot inflate as they do the wall
                # time of a turn. Two clock reads only in turns that have such work.
                cpu_at = thread_time()
                if soon:
                    batch = soon[:]  # what these queue runs next turn, after a poll
                    del soon[:]
                    for fn in batch:
                        fn()
                if due:
                    self._run_timers(now)
                cpu = thread_time() - cpu_at
                if cpu > self.longest_deferred_cpu_s:
                    self.longest_deferred_cpu_s = cpu

    def release(self) -> None:
        """Close every handler still registered, the wakeup pair and the epoll fd."""
        for handler in list(self._handlers.values()):
            self.close(handler)
        self._wakeup.close()
        self._ep.close()

    def abandon(self) -> None:
        """In a forked child that builds its own reactor: close this one's epoll fd and
        wakeup pair, and leave its handlers' descriptors to the caller (the parent still
        uses them)."""
        self._handlers.clear()
        self._wakeup.close()
        self._ep.close()


class _SignalWakeup:
    """The socketpair that signal.set_wakeup_fd() writes signal numbers to."""

    __slots__ = ("_fns", "_r", "_w", "active_at", "fd", "mask", "write_fd")

    def __init__(self, fns: dict[int, Callable[[int], None]]) -> None:
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        self._fns = fns
        self.fd = self._r.fileno()
        self.write_fd = self._w.fileno()
        self.mask = select.EPOLLIN
        self.active_at = 0.0

    def on_event(self, events: int) -> int:
        try:
            data = self._r.recv(4096)
        except BlockingIOError:
            return self.mask
        for signum in data:
            fn = self._fns.get(signum)
            if fn is not None:
                fn(signum)
        return select.EPOLLIN

    def close(self) -> None:
        self._r.close()
        self._w.close()

    def handoff_state(self, out: object) -> None:
        """Nothing travels at a restart handoff: the next process makes its own."""

    def __repr__(self) -> str:
        return f"<SignalWakeup fd={self.fd}>"


def _merge(events: list[tuple[int, int]], ready: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The kernel's events plus the synthetic ones, one entry per fd: a handler that used up
    its budget and also got a new edge is dispatched once per turn, like in level mode,
    not twice (which let edge-mode firehoses take twice their share)."""
    extra: dict[int, int] = {}
    for fd, ev in ready:
        extra[fd] = extra.get(fd, 0) | ev
    if events:
        events = [(fd, ev | extra.pop(fd, 0)) for fd, ev in events]
    events += extra.items()
    return events


def _trace_batch(events: list[tuple[int, int]]) -> None:
    for fd, ev in events:
        log.debug("epoll_event", fd=fd, events=describe_events(ev))


def _record_only(signum: int, frame: object) -> None:
    """The wakeup fd already carries the signal number to the loop: nothing to do here."""
