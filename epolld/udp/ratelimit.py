"""Which UDP datagrams get an echo: refused source ports, per-source and total token buckets.

Sans-IO: UdpLimiter.admit() is given the source, the size and the time, and answers with
None (echo it) or the reason to drop it. There is no socket and no clock inside, so the
policy is tested on numbers alone, with a fake clock.

Why each guard exists (issue 10, and etc/epolld.yaml says the same to operators):
- Refused source ports: a reply to chargen (19) or another echo (7) starts a loop that
  never ends (CVE-1999-0103); a reply "to" DNS or NTP with a forged source is reflection
  at that service. FreeBSD inetd's check_loop() refuses the same ports.
- Per-source buckets (datagrams and bytes): one client, or one forged victim address,
  gets at most rate x t + burst replies.
- The total bucket: forged sources are countless, so per-source state alone cannot cap
  the replies; this one bucket does.
- The source table is an LRU of at most `sources` entries: a flood from 50,000 forged
  addresses evicts old entries instead of growing memory. A forgotten source comes back
  with a full bucket, which the total bucket still bounds.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

from epolld.config import UdpConfig

# Drop reasons, as counted in stats and named in logs.
SOURCE_PORT: Final = "source_port"
RATE: Final = "rate"
BYTE_RATE: Final = "byte_rate"
TOTAL_RATE: Final = "total_rate"

REPORT_INTERVAL_S = 10.0  # a rate-limited source is logged at most once per interval
MAX_REPORTS_PER_INTERVAL = 20  # sources logged per interval at most; the rest are summed


@dataclass(slots=True)
class Report:
    """Datagrams dropped for one source (or, with source "", over all) since its last report."""

    source: str | int | bytes  # the key admit() was given
    reason: str  # the reason of the latest drop
    dropped: int


class _Source:
    """The two buckets of one source address and its report state."""

    __slots__ = ("bytes", "datagrams", "dropped", "report_after", "stamp")

    def __init__(self, datagrams: float, nbytes: float, now: float) -> None:
        self.datagrams = datagrams
        self.bytes = nbytes
        self.stamp = now
        self.dropped = 0  # since the last report
        self.report_after = now  # the first drop is reported at once


class UdpLimiter:
    """The UDP echo policy of one daemon: every UDP listener shares it.

    Args:
        settings: the udp: section; configure() replaces it on reload.
        now: the current time in seconds (time.monotonic() in the daemon).
    """

    def __init__(self, settings: UdpConfig, now: float) -> None:
        self._sources: OrderedDict[str | int | bytes, _Source] = OrderedDict()
        self._total = 0.0
        self._total_stamp = now
        self._total_dropped = 0
        self._total_report_after = now
        self._window_end = now
        self._window_reports = 0
        self._unreported = 0  # reports left out of the log since the last take_reports()
        self._reports: list[Report] = []
        self.configure(settings, now, initial=True)

    def __len__(self) -> int:
        """Source addresses tracked now; never more than settings.sources."""
        return len(self._sources)

    def configure(self, settings: UdpConfig, now: float, *, initial: bool = False) -> None:
        """Apply new limits at once: buckets are cut to their new sizes, the table to its bound.

        Args:
            settings: the new udp: section.
            now: the current time.
            initial: fill the total bucket (first call only).
        """
        self._refused = frozenset(settings.refuse_source_ports)
        self.refused_ports = self._refused
        # Whether admit() has more to do than look the port up in refused_ports: a batch
        # of datagrams checks the port itself when it does not (cheaper than a call each).
        self.admit_each = bool(settings.rate or settings.byte_rate_bytes or settings.total_rate)
        self._rate = float(settings.rate)
        self._burst = float(settings.burst)
        self._byte_rate = float(settings.byte_rate_bytes)
        # A datagram of max_datagram bytes must fit in the byte bucket, or it never passes.
        self._byte_burst = float(max(settings.byte_rate_bytes, settings.max_datagram_bytes))
        self._total_rate = float(settings.total_rate)
        self._total_burst = max(1.0, self._total_rate)  # one second's worth
        self._max_sources = settings.sources
        self._per_source = bool(self._rate or self._byte_rate)
        if initial:
            self._total = self._total_burst
        self._refill_total(now)
        self._total = min(self._total, self._total_burst)
        if not self._per_source:
            self._sources.clear()
            return
        while len(self._sources) > self._max_sources:
            self._sources.popitem(last=False)
        for entry in self._sources.values():
            entry.datagrams = min(entry.datagrams, self._burst)
            entry.bytes = min(entry.bytes, self._byte_burst)

    def admit(self, source: str | int | bytes, port: int, size: int, now: float) -> str | None:
        """Decide one datagram: None to echo it (its tokens are taken), else the drop reason.

        Args:
            source: the source IP address: as text, or any other key that is one per
                address (a batch passes the raw sin_addr as an int, sin6_addr as bytes).
            port: the source port.
            size: the datagram's length in bytes.
            now: the current time (monotonic seconds).
        """
        if port in self._refused:
            return SOURCE_PORT
        entry = None
        if self._per_source:
            entry = self._sources.get(source)
            if entry is None:
                entry = _Source(self._burst, self._byte_burst, now)
                self._sources[source] = entry
                if len(self._sources) > self._max_sources:
                    self._sources.popitem(last=False)  # the least recently seen
            else:
                self._sources.move_to_end(source)
                elapsed = now - entry.stamp
                if elapsed > 0:
                    entry.stamp = now
                    entry.datagrams = min(self._burst, entry.datagrams + elapsed * self._rate)
                    entry.bytes = min(self._byte_burst, entry.bytes + elapsed * self._byte_rate)
            if self._rate and entry.datagrams < 1.0:
                return self._drop(source, entry, RATE, now)
            if self._byte_rate and entry.bytes < size:
                return self._drop(source, entry, BYTE_RATE, now)
        if self._total_rate:
            elapsed = now - self._total_stamp  # _refill_total(), inline: once per datagram
            if elapsed > 0:
                self._total_stamp = now
                self._total = min(self._total_burst, self._total + elapsed * self._total_rate)
            if self._total < 1.0:
                self._total_dropped += 1
                if now >= self._total_report_after:
                    self._reports.append(Report("", TOTAL_RATE, self._total_dropped))
                    self._total_dropped = 0
                    self._total_report_after = now + REPORT_INTERVAL_S
                return TOTAL_RATE
            self._total -= 1.0
        if entry is not None:
            if self._rate:
                entry.datagrams -= 1.0
            if self._byte_rate:
                entry.bytes -= size
        return None

    def take_reports(self) -> tuple[list[Report], int]:
        """The drops to log since the last call, and how many sources were left out.

        Each source is reported at most once per REPORT_INTERVAL_S, and at most
        MAX_REPORTS_PER_INTERVAL sources per interval: forged sources must not flood the log.
        """
        reports, self._reports = self._reports, []
        unreported, self._unreported = self._unreported, 0
        return reports, unreported

    def _refill_total(self, now: float) -> None:
        elapsed = now - self._total_stamp
        if elapsed > 0:
            self._total_stamp = now
            self._total = min(self._total_burst, self._total + elapsed * self._total_rate)

    def _drop(self, source: str | int | bytes, entry: _Source, reason: str, now: float) -> str:
        entry.dropped += 1
        if now >= entry.report_after:
            if now >= self._window_end:  # the log itself is bounded: forged sources are many
                self._window_end = now + REPORT_INTERVAL_S
                self._window_reports = 0
            if self._window_reports < MAX_REPORTS_PER_INTERVAL:
                self._window_reports += 1
                self._reports.append(Report(source, reason, entry.dropped))
            else:
                self._unreported += 1
            entry.dropped = 0
            entry.report_after = now + REPORT_INTERVAL_S
        return reason
