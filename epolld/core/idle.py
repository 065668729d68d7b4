"""Idle timeouts that cost nothing per event.

Events only store the loop's clock in ``conn.active_at``. Connections sit in
coarse buckets keyed by when they could first expire; a sweep every tick looks
only at due buckets and moves the still-active ones forward. Closing removes a
connection from its bucket, so nothing holds closed connections. A connection
refers to its bucket (a dict shared by many) rather than to a key of its own:
a large int per connection is 28 bytes. An emptied bucket stays until it is due.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol


class Idler(Protocol):
    active_at: float
    idle_bucket: dict[Idler, None] | None  # the bucket it is filed in


class IdleTimer:
    """Buckets of connections by idle deadline.

    Args:
        timeout_s: how long a connection may be silent; 0 disables the timer.
    """

    def __init__(self, timeout_s: float) -> None:
        self._buckets: dict[int, dict[Idler, None]] = {}
        self._set_timeout(timeout_s)

    def _set_timeout(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        # Deadlines are rounded up to a tick: an idle peer is closed between
        # timeout_s and timeout_s + tick_s after its last event.
        self.tick_s = min(1.0, max(0.05, timeout_s / 8)) if timeout_s > 0 else 1.0

    def add(self, conn: Idler) -> None:
        if self.timeout_s <= 0:
            return
        key = math.ceil((conn.active_at + self.timeout_s) / self.tick_s)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = {}
        bucket[conn] = None
        conn.idle_bucket = bucket

    def remove(self, conn: Idler) -> None:
        bucket = conn.idle_bucket
        if bucket is not None:
            del bucket[conn]
            conn.idle_bucket = None

    def expired(self, now: float) -> list[Idler]:
        """Remove and return the connections silent for timeout_s; re-file the others."""
        if not self._buckets:
            return []
        due = [k for k in self._buckets if k * self.tick_s <= now]
        expired: list[Idler] = []
        for key in due:
            for conn in self._buckets.pop(key):
                conn.idle_bucket = None
                if conn.active_at + self.timeout_s <= now:
                    expired.append(conn)
                else:
                    self.add(conn)
        return expired

    def retime(self, timeout_s: float, conns: Sequence[Idler]) -> None:
        """Apply a new timeout to every open connection (a reload; O(n) once)."""
        self._buckets.clear()
        self._set_timeout(timeout_s)
        for conn in conns:
            conn.idle_bucket = None
            self.add(conn)
