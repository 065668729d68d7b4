"""What the service reports: the stats line (SIGUSR1, every stats_interval, at the end),
the metrics endpoint's snapshot, and STATUS= for systemctl status. Totals are the
counters (updated at accept, close and reload only) plus the open connections' live
values, added up when asked.
"""

from __future__ import annotations

import time
from typing import Any

import structlog

from epolld.core.counters import Counters, Snapshot
from epolld.core.loop import Reactor
from epolld.service.admission import Admission
from epolld.service.proxied import Proxied
from epolld.udp.endpoint import UdpEndpoints

log = structlog.get_logger("epolld")


class Report:
    """The service's numbers, read from the parts that keep them.

    Args:
        reactor: the process's reactor (its clock).
        counters: the totals (the metrics endpoint reads this very object).
        admission, proxied, udp: the parts whose live values are added.
    """

    def __init__(
        self,
        reactor: Reactor,
        counters: Counters,
        admission: Admission,
        proxied: Proxied,
        udp: UdpEndpoints,
    ) -> None:
        self.reactor = reactor
        self.counters = counters
        self._admission = admission
        self._proxied = proxied
        self._udp = udp
        self.started_at = reactor.now  # the previous process's, after a handoff
        self._status_bytes = (reactor.now, 0)

    def snapshot(self) -> Snapshot:
        """The counters and the live values, for the metrics endpoint (once per scrape)."""
        bytes_in, bytes_out = self._byte_totals()
        return Snapshot(
            counters=self.counters,
            connections=self._admission.conn_count,
            bytes_received=bytes_in,
            bytes_sent=bytes_out,
            listeners=len(self._admission.registered),
            accept_paused=bool(self._admission.paused),
            # Once UDP has served, its series stay (counters must not vanish on a reload).
            udp=self._udp.stats if len(self._udp) or self._udp.stats.received else None,
            proxy_header_errors=dict(self._proxied.header_errors.counts)
            if any(lst.proxy_protocol for lst in self._admission.listeners)
            else None,
        )

    def _byte_totals(self) -> tuple[int, int]:
        """Bytes in and out so far: closed connections' totals plus the open ones'."""
        conns = self._admission.connections()
        return (
            self.counters.bytes_received + sum(c.bytes_in for c in conns),
            self.counters.bytes_sent + sum(c.bytes_out for c in conns),
        )

    def stats(self) -> dict[str, Any]:
        """Live counters."""
        bytes_in, bytes_out = self._byte_totals()
        return {
            "connections": self._admission.conn_count,
            "accepted": self.counters.accepted,
            "refused": sum(self.counters.refused.values()),
            "bytes_in": bytes_in,
            "bytes_out": bytes_out,
            "uptime_s": round(self.reactor.now - self.started_at, 1),
            "listeners": len(self._admission.registered),
            "accept_paused": bool(self._admission.paused),
            "splice_connections": self._admission.pipes,
            **self._udp.counters(),
            "proxy_reading": len(self._proxied.readers),
            "proxy_headers_read": self._proxied.headers_read,
            "proxy_header_errors": dict(self._proxied.header_errors.counts),
        }

    def log_stats(self) -> None:
        log.info("stats", **self.stats())

    def status_line(self) -> str:
        names = " ".join(lst.name for lst in [*self._admission.listeners, *self._udp.listeners])
        now = time.monotonic()
        total = self._byte_totals()[1]
        then, before = self._status_bytes
        self._status_bytes = (now, total)
        rate = (total - before) / (now - then) / 1e6 if now > then else 0.0
        line = f"echoing on {names}; {self._admission.conn_count} connections; {rate:.1f} MB/s"
        if len(self._udp):
            counts = self._udp.stats
            dropped = sum(counts.dropped.values())
            line += f"; {counts.echoed} datagrams echoed, {dropped} dropped"
        return line
