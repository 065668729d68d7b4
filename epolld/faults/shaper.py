"""What a fault listener lets out, and when: a delay queue, a token bucket and a byte limit,
without sockets or clock (the caller passes `now`), so that it can be tested on bytes.

Whatever produces the bytes (the echo of a connection now; a generated stream such as
chargen later) pushes them in; the connection takes out what is due with release() and
sends it. Bytes leave in the order they came in: a chunk's due time is never earlier
than the one before it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Final

from epolld.config import Faults

BURST_BYTES: Final = 64 * 1024  # a bandwidth bucket's size: the largest burst
# A chunk due within this much of the previous one joins it (and waits as long as the
# later of the two): the queue holds at most (delay + jitter) / MERGE_S entries, whatever
# the size of the reads, so a client writing one byte at a time cannot grow it.
MERGE_S: Final = 0.001
# When the bucket is short, wait for at least this much (or the whole head chunk) before
# waking again: sends of a few bytes each would cost a wakeup per few bytes.
MIN_REFILL_BYTES: Final = 4096
MIN_WAIT_S: Final = 0.001  # epoll's resolution


class Shaper:
    """Delays, rate-limits and caps one connection's output.

    Args:
        faults: the listener's faults (delay_s, jitter_s, bandwidth_bytes_per_s, and the
            byte limit: the smaller of close_after_bytes and reset_after_bytes).
        now: the clock at creation (the bucket starts full).
        random: a function returning a float in [0, 1) (jitter).
    """

    __slots__ = (
        "_delay_s",
        "_jitter_s",
        "_random",
        "_rate",
        "_tokens",
        "_tokens_at",
        "limit_left",
        "queue",
        "queued",
    )

    def __init__(self, faults: Faults, now: float, random: Callable[[], float]) -> None:
        self._delay_s = faults.delay_s
        self._jitter_s = faults.jitter_s
        self._random = random
        self._rate = faults.bandwidth_bytes_per_s
        self._tokens = float(BURST_BYTES)
        self._tokens_at = now
        limits = [n for n in (faults.close_after_bytes, faults.reset_after_bytes) if n is not None]
        # Bytes that may still be pushed; None: no limit. Beyond it, push() refuses.
        self.limit_left: int | None = min(limits) if limits else None
        self.queue: deque[list[float | bytearray]] = deque()  # [due, bytes] in order
        self.queued = 0  # bytes in the queue

    @property
    def delays(self) -> bool:
        return bool(self._delay_s or self._jitter_s)

    @property
    def exhausted(self) -> bool:
        """The byte limit is reached: nothing more will be pushed."""
        return self.limit_left == 0

    def push(self, data: bytes | bytearray | memoryview, now: float) -> int:
        """Queue data, due after the delay; returns how many bytes were taken (fewer than
        given once the byte limit is reached: the rest is never sent)."""
        if self.limit_left is not None:
            if len(data) > self.limit_left:
                data = data[: self.limit_left]
            self.limit_left -= len(data)
        if not data:
            return 0
        due = now
        if self._delay_s or self._jitter_s:
            due += self._delay_s + self._jitter_s * self._random()
        queue = self.queue
        if queue:
            last = queue[-1]
            last_due: float = last[0]  # type: ignore[assignment]
            if due - last_due < MERGE_S:
                last[0] = max(due, last_due)
                last[1] += data  # type: ignore[operator]
                self.queued += len(data)
                return len(data)
        queue.append([due, bytearray(data)])
        self.queued += len(data)
        return len(data)

    def release(self, now: float) -> tuple[bytearray | None, bool]:
        """Take out what is due and what the bucket allows.

        Returns:
            (the bytes, or None; whether the bucket held any back).
        """
        queue = self.queue
        if not queue or queue[0][0] > now:  # type: ignore[operator]
            return None, False
        budget = self._refill(now) if self._rate else self.queued
        out: bytearray | None = None
        while queue and budget > 0 and queue[0][0] <= now:  # type: ignore[operator]
            head = queue[0]
            chunk: bytearray = head[1]  # type: ignore[assignment]
            if len(chunk) <= budget:
                queue.popleft()
                take = chunk
            else:
                take = chunk[:budget]
                del chunk[:budget]
            budget -= len(take)
            if out is None:
                out = take
            else:
                out += take
        held = bool(queue) and queue[0][0] <= now  # type: ignore[operator]
        if out is not None:
            self.queued -= len(out)
            if self._rate:
                self._tokens -= len(out)
        return out, held

    def _refill(self, now: float) -> int:
        self._tokens = min(float(BURST_BYTES), self._tokens + (now - self._tokens_at) * self._rate)
        self._tokens_at = now
        return int(self._tokens)

    def wake_at(self, now: float) -> float | None:
        """When release() will next have something (None: the queue is empty)."""
        if not self.queue:
            return None
        due: float = self.queue[0][0]  # type: ignore[assignment]
        if due > now or not self._rate:
            return max(due, now)
        want = min(len(self.queue[0][1]), MIN_REFILL_BYTES)  # type: ignore[arg-type]
        short = want - self._refill(now)
        return now + max(MIN_WAIT_S, short / self._rate)

    def take_all(self) -> bytes:
        """Everything queued, in order, without emptying the queue (a handoff record)."""
        return b"".join(bytes(chunk) for _, chunk in self.queue)  # type: ignore[arg-type]

    def clear(self) -> int:
        """Drop the queue (a close or reset before it went out); returns the bytes dropped."""
        dropped = self.queued
        self.queue.clear()
        self.queued = 0
        return dropped
