"""The supervisor's numbers: every worker's totals summed, the workers' live values, the
stats line, the metrics snapshot and STATUS=. The supervisor holds no connection, so all of
it comes from what the workers report (link.py's heartbeat and stats messages).

A worker reports what it counted itself (its totals less what it restored from its
predecessor). What no live worker reports any more is `retired`: the workers that exited
(at their last report), those that handed over (at the final count their handed_over
message brings: their successors report only what they count themselves), and after a
restart handoff everything the previous supervisor had summed. So nothing is counted
twice, and no total waits for a worker's first report.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from epolld.core.counters import Counters, Snapshot
from epolld.observability import logsetup
from epolld.workers.slot import Slot

# The workers' live values in the stats line (the totals come from their Counters).
SUMMED_GAUGES = ("connections", "splice_connections", "proxy_reading", "udp_sources")
SHARED_GAUGES = ("listeners", "udp_listeners")  # every worker serves every address


class Sums:
    """Sum the slots' reports.

    Args:
        slots: every slot (a slot without a worker reports nothing and adds zero).
        own: the supervisor's own totals (its reloads).
        started_at: the reactor's clock at the first start (kept across a handoff).
    """

    def __init__(self, slots: Sequence[Slot], own: Counters, started_at: float) -> None:
        self._slots = slots
        self._own = own
        self.started_at = started_at
        self.retired = Counters()
        self._status_bytes = (time.monotonic(), 0)

    def resume(self, saved: dict[str, Any]) -> bool:
        """Carry on from a previous supervisor's state (its "supervisor" document).

        Returns:
            True if that state predates the sums travelling: each slot's next worker
            restores totals this supervisor has not counted (see `inherited()`).
        """
        self.started_at = float(saved.get("started_at", self.started_at))
        self._own.reloads.update(Counters.from_dict(saved).reloads)
        legacy = "totals" not in saved
        self.retired = _legacy_retired(saved) if legacy else Counters.from_dict(saved["totals"])
        # STATUS='s rate counts from here, not the restored bytes as if sent just now.
        self._status_bytes = (time.monotonic(), self.retired.bytes_sent)
        return legacy

    def report(self, slot: Slot, message: dict[str, Any]) -> None:
        """A heartbeat's or a stats answer's numbers (stale once the slot handed over).
        A heartbeat without "counters" (a worker with many connections sends them in one
        of every few: worker.py) leaves the last ones in place."""
        if slot.handoff is None:
            slot.stats = message.get("stats") or {}
            if "counters" in message:
                slot.counters = Counters.from_dict(message["counters"] or {})

    def inherited(self, record: dict[str, Any]) -> None:
        """What a worker took over that no sum of ours holds yet (a legacy state)."""
        self.retired.add(Counters.from_dict(record))

    def retire(self, slot: Slot, final: dict[str, Any] | None = None) -> None:
        """Keep what a worker counted (as last reported, or its final count when it hands
        over) once it no longer reports, so that the totals never go back."""
        self.retired.add(slot.counters if final is None else Counters.from_dict(final))
        slot.counters = Counters()

    def totals(self) -> Counters:
        """Every worker's totals summed: the retired ones, and each live worker's last
        report; the reloads are this process's own, and so are its dropped log lines."""
        total = self.retired.copy()
        for slot in self._slots:
            total.add(slot.counters)
        total.reloads = dict(self._own.reloads)
        total.last_reload_ok = self._own.last_reload_ok
        total.log_lines_dropped += logsetup.dropped_lines()
        return total

    def stats(self, now: float, totals: Counters | None = None) -> dict[str, Any]:
        """The summed totals, the workers' live values (as last reported), and one line
        per worker."""
        live = [slot for slot in self._slots if slot.state.has_process]
        gauges = {key: sum(int(s.stats.get(key, 0)) for s in live) for key in SUMMED_GAUGES}
        for key in SHARED_GAUGES:
            gauges[key] = max((int(s.stats.get(key, 0)) for s in live), default=0)
        return {
            **(self.totals() if totals is None else totals).stats_fields(),
            **gauges,
            "uptime_s": round(now - self.started_at, 1),
            "accept_paused": any(s.stats.get("accept_paused") for s in live),
            "workers": [
                {
                    "worker": s.index,
                    "pid": s.pid,
                    "connections": s.stats.get("connections", 0),
                    "accepted": s.stats.get("accepted", 0),
                    "longest_turn_ms": s.stats.get("longest_turn_ms", 0.0),
                    "longest_deferred_cpu_ms": s.stats.get("longest_deferred_cpu_ms", 0.0),
                    "slow_turns": s.stats.get("slow_turns", 0),
                }
                for s in live
            ],
        }

    def snapshot(
        self,
        now: float,
        proxy_listening: bool,
        tls_certificates: Mapping[str, float] | None = None,
    ) -> Snapshot:
        """The metrics endpoint's view: the summed totals and the workers' live values."""
        totals = self.totals()
        stats = self.stats(now, totals)
        return Snapshot(
            counters=totals,
            connections=stats["connections"],
            listeners=stats["listeners"],
            accept_paused=stats["accept_paused"],
            udp=bool(stats["udp_listeners"] or totals.udp_received),
            proxy=proxy_listening
            or totals.proxy_headers_read > 0
            or any(totals.proxy_header_errors.values()),
            tls_certificates=tls_certificates,
        )

    def status_line(self, now: float, names: str) -> str:
        stats = self.stats(now)
        wall = time.monotonic()
        then, before = self._status_bytes
        self._status_bytes = (wall, stats["bytes_out"])
        rate = (stats["bytes_out"] - before) / (wall - then) / 1e6 if wall > then else 0.0
        return (
            f"echoing on {names}; {len(stats['workers'])} workers; "
            f"{stats['connections']} connections; {rate:.1f} MB/s"
        )


def _legacy_retired(saved: dict[str, Any]) -> Counters:
    """The exited workers' totals in a state from before the sums travelled: Counters in
    "retired", and in "retired_stats" the stats line's numbers (whose bytes include what
    their open connections had moved, and the only copy of the UDP and PROXY totals)."""
    retired = Counters.from_dict(saved.get("retired") or {})
    stats = {key: int(n) for key, n in (saved.get("retired_stats") or {}).items()}
    retired.bytes_received = stats.get("bytes_in", retired.bytes_received)
    retired.bytes_sent = stats.get("bytes_out", retired.bytes_sent)
    retired.udp_received += stats.get("udp_received", 0)
    retired.udp_echoed += stats.get("udp_echoed", 0)
    retired.udp_icmp_errors += stats.get("udp_icmp_errors", 0)
    retired.proxy_headers_read += stats.get("proxy_headers_read", 0)
    prefix = "udp_dropped_"
    for key, n in stats.items():
        if key.startswith(prefix):
            retired.udp_dropped[key[len(prefix) :]] = n
    return retired
