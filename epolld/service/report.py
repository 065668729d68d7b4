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
from epolld.observability import logsetup
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
        """The totals and the live values, for the metrics endpoint (once per scrape)."""
        totals = self.totals()
        return Snapshot(
            counters=totals,
            connections=self._admission.conn_count,
            listeners=len(self._admission.registered),
            accept_paused=bool(self._admission.paused),
            # Once they have counted, the series stay (counters must not vanish on a reload).
            udp=bool(len(self._udp) or totals.udp_received),
            proxy=any(lst.proxy_protocol for lst in self._admission.listeners)
            or totals.proxy_headers_read > 0
            or any(totals.proxy_header_errors.values()),
            tls_certificates=self._admission.tls.certificates()
            if self._admission.tls is not None
            else None,
        )

    def totals(self) -> Counters:
        """Every total so far (a restored predecessor's included), the bytes of open
        connections too: a copy, for reports."""
        totals = self.stored_totals()
        for conn in self._admission.connections():
            totals.bytes_received += conn.bytes_in
            totals.bytes_sent += conn.bytes_out
            service = getattr(conn, "SERVICE", None)  # services/ connections
            if service is not None:
                totals.count_service(service, "tcp", conn.bytes_in, conn.bytes_out)
        return totals

    def stored_totals(self) -> Counters:
        """The totals without the open connections' bytes (their records carry those)."""
        totals = self.counters.copy()
        self._udp.stats.add_to(totals)
        totals.log_lines_dropped += logsetup.dropped_lines()
        return totals

    def stats(self, totals: Counters | None = None) -> dict[str, Any]:
        """The totals (totals(), unless given) and the live values, for the stats line."""
        if totals is None:
            totals = self.totals()
        return {
            "connections": self._admission.conn_count,
            **totals.stats_fields(),
            "uptime_s": round(self.reactor.now - self.started_at, 1),
            "listeners": len(self._admission.registered),
            "accept_paused": bool(self._admission.paused),
            "splice_connections": self._admission.pipes,
            **self._udp.gauges(),
            "proxy_reading": len(self._proxied.readers),
            "longest_turn_ms": round(self.reactor.longest_turn_s * 1000, 1),
            "longest_deferred_cpu_ms": round(self.reactor.longest_deferred_cpu_s * 1000, 1),
            "slow_turns": self.reactor.slow_turns,
        }

    def log_stats(self) -> None:
        log.info("stats", **self.stats())

    def status_line(self) -> str:
        names = " ".join(lst.name for lst in [*self._admission.listeners, *self._udp.listeners])
        now = time.monotonic()
        totals = self.totals()
        then, before = self._status_bytes
        self._status_bytes = (now, totals.bytes_sent)
        rate = (totals.bytes_sent - before) / (now - then) / 1e6 if now > then else 0.0
        line = f"echoing on {names}; {self._admission.conn_count} connections; {rate:.1f} MB/s"
        if len(self._udp):
            dropped = sum(totals.udp_dropped.values())
            line += f"; {totals.udp_echoed} datagrams echoed, {dropped} dropped"
        return line

    def restart_rate(self) -> None:
        """STATUS='s rate counts from now, not the restored bytes as if sent just now."""
        self._status_bytes = (time.monotonic(), self.totals().bytes_sent)
