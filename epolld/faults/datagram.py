"""Faults on a UDP listener: a fraction of datagrams not answered, the rest answered late.

The endpoint (udp/endpoint.py) asks once per datagram, after its own checks and the rate
limiter admitted it, and before it sends the reply:

    if self.faults is not None and self.faults.intercept(payload, addr, ancdata, now):
        return None  # taken: dropped (counted here) or held (sent and counted later)

intercept() returns False when the reply is to go out now, as without faults. A held
reply waits in a bounded heap (MAX_HELD datagrams, MAX_HELD_BYTES): beyond that it is
dropped and counted as send_buffer, never queued without bound. Replies may overtake each
other with jitter, as datagrams do. Held replies travel through a restart handoff in the
endpoint's record (handoff_held, restore_held) and keep their due time: CLOCK_MONOTONIC
is the machine's, not the process's.
"""

from __future__ import annotations

import heapq
import itertools
import random
import socket
from typing import TYPE_CHECKING, Any, Final, Protocol

from epolld.config import Faults

if TYPE_CHECKING:
    from epolld.core.loop import Reactor, Timer
    from epolld.handoff import State, StateWriter

MAX_HELD: Final = 4096  # datagrams waiting for their delay, per UDP socket
MAX_HELD_BYTES: Final = 4 * 1024 * 1024
SEND_BUFFER: Final = "send_buffer"  # udp/endpoint.py's reason for a reply it could not send
SEND_ERROR: Final = "send_error"
_SEND_FULL_ERRNOS: Final = frozenset({11, 105})  # EAGAIN, ENOBUFS


class ReplyStats(Protocol):
    """What this module counts in udp/endpoint.py's UdpStats (not imported: it imports us)."""

    echoed: int
    dropped: dict[str, int]


class DatagramFaults:
    """One UDP socket's faults and its held replies.

    Args:
        faults: drop (a fraction), delay_s and jitter_s.
        reactor: for the timer that sends held replies.
        sock: the UDP socket the replies leave from.
        stats: the endpoint's UdpStats (echoed, dropped by reason).
        counts: Counters.faults (drop, delay).
    """

    def __init__(
        self,
        faults: Faults,
        reactor: Reactor,
        sock: socket.socket,
        stats: ReplyStats,
        counts: dict[str, int],
    ) -> None:
        self.faults = faults
        self._reactor = reactor
        self._sock = sock
        self._stats = stats
        self._counts = counts
        self._random = random.Random().random
        self._held: list[tuple[float, int, bytes, Any, list[tuple[int, int, bytes]]]] = []
        self._held_bytes = 0
        self._seq = itertools.count()
        self._timer: Timer | None = None

    def intercept(
        self, payload: memoryview, addr: Any, ancdata: list[tuple[int, int, bytes]], now: float
    ) -> bool:
        """Take this reply (True: dropped or held, and counted) or let it go now (False)."""
        faults = self.faults
        if faults.drop and self._random() < faults.drop:
            self._counts["drop"] = self._counts.get("drop", 0) + 1
            return True
        if not (faults.delay_s or faults.jitter_s):
            return False
        if len(self._held) >= MAX_HELD or self._held_bytes + len(payload) > MAX_HELD_BYTES:
            self._stats.dropped[SEND_BUFFER] += 1
            return True
        due = now + faults.delay_s + faults.jitter_s * self._random()
        heapq.heappush(self._held, (due, next(self._seq), bytes(payload), addr, ancdata))
        self._held_bytes += len(payload)
        self._counts["delay"] = self._counts.get("delay", 0) + 1
        self._arm()
        return True

    def _arm(self) -> None:
        if not self._held:
            return
        due = self._held[0][0]
        if self._timer is not None:
            if self._timer.when <= due:
                return
            self._timer.cancel()
        self._timer = self._reactor.call_later(max(0.0, due - self._reactor.now), self._send_due)

    def _send_due(self) -> None:
        self._timer = None
        if self._sock.fileno() < 0:  # closed meanwhile
            return
        now = self._reactor.now
        held, stats = self._held, self._stats
        while held and held[0][0] <= now:
            _, _, data, addr, ancdata = heapq.heappop(held)
            self._held_bytes -= len(data)
            try:
                if ancdata:
                    self._sock.sendmsg([data], ancdata, 0, addr)
                else:
                    self._sock.sendto(data, addr)
            except OSError as e:
                stats.dropped[SEND_BUFFER if e.errno in _SEND_FULL_ERRNOS else SEND_ERROR] += 1
                continue
            stats.echoed += 1
        self._arm()

    def handoff_held(self, out: StateWriter) -> list[dict[str, Any]]:
        """The held replies for the next process (the loop does not turn again here, so
        none is also sent by this one)."""
        return [
            {
                "due": due,
                "data": out.data(data),
                "addr": list(addr),
                "ancdata": [[level, kind, out.data(value)] for level, kind, value in ancdata],
            }
            for due, _, data, addr, ancdata in sorted(self._held)
        ]

    def restore_held(self, held: list[dict[str, Any]], state: State) -> None:
        """Hold again what the previous process held, within the same bounds."""
        for item in held:
            data = state.data(item["data"])
            if len(self._held) >= MAX_HELD or self._held_bytes + len(data) > MAX_HELD_BYTES:
                self._stats.dropped[SEND_BUFFER] += 1
                continue
            ancdata = [
                (int(level), int(kind), state.data(ref)) for level, kind, ref in item["ancdata"]
            ]
            entry = (float(item["due"]), next(self._seq), data, tuple(item["addr"]), ancdata)
            heapq.heappush(self._held, entry)
            self._held_bytes += len(data)
        self._arm()

    def close(self) -> None:
        """The socket is going: forget what is held."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._held.clear()
        self._held_bytes = 0
