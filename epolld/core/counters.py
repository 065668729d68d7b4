"""What epolld counts: one list of totals (Counters) that adds, subtracts, serialises and
restores itself, and the Snapshot the metrics endpoint reads at scrape time.

Counters holds every monotonic total the stats line and /metrics show. Its fields are the
list: add(), subtract(), to_dict() and from_dict() work from each field's kind (an int, a
dict of ints by label, the DurationHistogram), so a total added here travels with the
restart handoff, a worker's reports and the supervisor's sums without more code. Gauges
(open connections, listeners, accept_paused, ...) are live values, not kept here.

The hot paths are not touched: the service updates its Counters at accept, close and
reload; UDP endpoints keep their own per-datagram attributes (udp.UdpStats), added into
a copy of the totals when a report is made. This module imports nothing heavy, so the
service owns a Counters whether or not metrics are on.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Upper bounds of the connection duration histogram, in seconds: echo sessions range from
# a probe (milliseconds) to a long-lived client (hours).
DURATION_BUCKETS_S = (0.005, 0.05, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 1800.0, 3600.0, 86400.0)
# The label values, fixed so that every series exists (at 0) from the start.
CLOSE_REASONS = ("eof", "reset", "error", "idle_timeout", "shutdown")
REFUSE_LIMITS = ("max_connections", "max_connections_per_ip")
RELOAD_RESULTS = ("success", "failure")
HANDSHAKE_RESULTS = ("success", "failure")
# Why a TLS handshake failed (tls/connection.py maps OpenSSL's reasons onto these).
HANDSHAKE_FAILURES = (
    "not_tls",
    "unsupported_version",
    "no_shared_cipher",
    "no_client_certificate",
    "bad_client_certificate",
    "timeout",
    "eof",
    "reset",
    "other",
)


def _zeros(keys: tuple[str, ...]) -> dict[str, int]:
    return dict.fromkeys(keys, 0)


@dataclass(slots=True)
class DurationHistogram:
    """Durations observed so far: a count per bucket (not cumulative; the last is +Inf)."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BUCKETS_S) + 1))
    sum_s: float = 0.0

    def observe(self, seconds: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bucket (Prometheus' le).
        self.counts[bisect.bisect_left(DURATION_BUCKETS_S, seconds)] += 1
        self.sum_s += seconds

    def combine(self, other: DurationHistogram, sign: int = 1) -> None:
        """Add (sign 1) or take away (sign -1) another histogram's observations."""
        for i, n in enumerate(other.counts):
            self.counts[i] += sign * n
        self.sum_s += sign * other.sum_s

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> DurationHistogram:
        """From to_dict()'s shape; a record with other buckets keeps its count and sum
        (what lies beyond our last bound goes to +Inf)."""
        saved = [int(n) for n in record.get("counts") or ()]
        hist = cls(sum_s=float(record.get("sum_s", 0.0)))
        last = len(hist.counts) - 1
        for i, n in enumerate(saved):
            hist.counts[min(i, last)] += n
        return hist


@dataclass(slots=True)
class Counters:
    """Every total since the first start (a restart handoff carries them on).

    Mutated in place only (restore() adds): the metrics endpoint and HeaderErrors hold
    references to this object and its dicts.
    """

    accepted: int = 0
    refused: dict[str, int] = field(default_factory=lambda: _zeros(REFUSE_LIMITS))
    closed: dict[str, int] = field(default_factory=lambda: _zeros(CLOSE_REASONS))
    # Bytes of closed connections in the service's own Counters; a report (the service's
    # totals()) adds the open connections' bytes, which a handoff carries in their records.
    bytes_received: int = 0
    bytes_sent: int = 0
    durations: DurationHistogram = field(default_factory=DurationHistogram)
    reloads: dict[str, int] = field(default_factory=lambda: _zeros(RELOAD_RESULTS))
    udp_received: int = 0
    udp_echoed: int = 0
    udp_icmp_errors: int = 0  # recv() errors from ICMP messages, skipped
    udp_dropped: dict[str, int] = field(default_factory=dict)  # by reason
    proxy_headers_read: int = 0
    proxy_header_errors: dict[str, int] = field(default_factory=dict)  # by reason
    # Log lines that stdout, the journal or the log file took none of (logsetup counts
    # them per process; a report adds them, as it adds the UDP endpoints' counts).
    log_lines_dropped: int = 0
    # The one state among the totals: merged with `and` (every part's last reload worked).
    last_reload_ok: bool = True
    # TLS (tls/): empty until a TLS listener is configured, so that no series appears
    # without one.
    tls_handshakes: dict[str, int] = field(default_factory=dict)  # by result
    tls_handshake_failures: dict[str, int] = field(default_factory=dict)  # by reason
    tls_handshake_durations: DurationHistogram = field(default_factory=DurationHistogram)
    # The services other than echo (services/): bytes by "transport service direction"
    # ("tcp chargen sent"), empty until one serves, so that no series appears without one.
    service_bytes: dict[str, int] = field(default_factory=dict)

    def count_service(self, service: str, transport: str, received: int, sent: int) -> None:
        """Account for the bytes a discard, chargen or info connection (or datagram)
        received and sent."""
        for direction, n in (("received", received), ("sent", sent)):
            key = f"{transport} {service} {direction}"
            self.service_bytes[key] = self.service_bytes.get(key, 0) + n

    def count_handshake(self, failure: str | None, seconds: float = 0.0) -> None:
        """Account for a TLS handshake that finished (failure None) or failed (its reason)."""
        if not self.tls_handshakes:
            self.tls_handshakes.update(_zeros(HANDSHAKE_RESULTS))
            self.tls_handshake_failures.update(_zeros(HANDSHAKE_FAILURES))
        if failure is None:
            self.tls_handshakes["success"] += 1
            self.tls_handshake_durations.observe(seconds)
        else:
            self.tls_handshakes["failure"] += 1
            self.tls_handshake_failures[failure] = self.tls_handshake_failures.get(failure, 0) + 1

    def count_close(self, reason: str, seconds: float, received: int, sent: int) -> None:
        """Account for a served connection that closed."""
        self.closed[reason] = self.closed.get(reason, 0) + 1
        self.durations.observe(seconds)
        self.bytes_received += received
        self.bytes_sent += sent

    def count_refused(self, limit: str) -> None:
        self.refused[limit] = self.refused.get(limit, 0) + 1

    def count_reload(self, ok: bool) -> None:
        self.reloads[RELOAD_RESULTS[0] if ok else RELOAD_RESULTS[1]] += 1
        self.last_reload_ok = ok

    # -- arithmetic, by field kind ------------------------------------------------------

    def add(self, other: Counters) -> None:
        """Add other's totals to these (a worker's report to the sum, a restored record)."""
        self._combine(other, 1)

    def subtract(self, other: Counters) -> None:
        """Take other's totals away (what a worker inherited, from what it reports)."""
        self._combine(other, -1)

    def _combine(self, other: Counters, sign: int) -> None:
        for name in _NAMES:
            mine, theirs = getattr(self, name), getattr(other, name)
            if isinstance(mine, bool):
                if sign > 0:
                    setattr(self, name, mine and theirs)
            elif isinstance(mine, int):
                setattr(self, name, mine + sign * theirs)
            elif isinstance(mine, dict):
                for key, n in theirs.items():
                    mine[key] = mine.get(key, 0) + sign * n
            else:
                mine.combine(theirs, sign)

    def copy(self) -> Counters:
        totals = Counters()
        totals.add(self)
        return totals

    # -- records: the handoff state, a worker's reports --------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: field name -> int, {label: int}, or the histogram's counts and sum_s."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, record: Mapping[str, Any], udp: Mapping[str, Any] | None = None) -> Counters:
        """The totals in a to_dict() record; a field this version does not know, or of
        another shape, is ignored.

        Args:
            record: a to_dict() record (any release's: the fields kept their names).
            udp: the UDP totals that records written before udp_* were fields carried
                beside them (received, echoed, icmp_errors, dropped; see legacy_udp()).
        """
        merged = {**{f"udp_{k}": v for k, v in (udp or {}).items()}, **record}
        totals = cls()
        for name in _NAMES:
            value = merged.get(name)
            if value is None:
                continue
            current = getattr(totals, name)
            try:
                if isinstance(current, bool):
                    setattr(totals, name, bool(value))
                elif isinstance(current, int):
                    setattr(totals, name, int(value))
                elif isinstance(current, dict):
                    current.update({str(k): int(n) for k, n in value.items()})
                else:
                    setattr(totals, name, DurationHistogram.from_dict(value))
            except (AttributeError, TypeError, ValueError):
                continue  # not written by us: leave that total at zero
        return totals

    def restore(self, record: Mapping[str, Any], udp: Mapping[str, Any] | None = None) -> None:
        """Carry on from a previous process's totals, in place (see from_dict())."""
        self.add(Counters.from_dict(record, udp))

    def legacy_udp(self) -> dict[str, Any]:
        """The UDP totals in the separate shape earlier releases read (a downgrade)."""
        return {
            "received": self.udp_received,
            "echoed": self.udp_echoed,
            "icmp_errors": self.udp_icmp_errors,
            "dropped": dict(self.udp_dropped),
        }

    def stats_fields(self) -> dict[str, Any]:
        """The totals as the stats line names them (bytes_in, udp_dropped_<reason>, ...)."""
        return {
            "accepted": self.accepted,
            "refused": sum(self.refused.values()),
            "bytes_in": self.bytes_received,
            "bytes_out": self.bytes_sent,
            "udp_received": self.udp_received,
            "udp_echoed": self.udp_echoed,
            "udp_dropped": sum(self.udp_dropped.values()),
            **{f"udp_dropped_{reason}": n for reason, n in self.udp_dropped.items()},
            "udp_icmp_errors": self.udp_icmp_errors,
            "proxy_headers_read": self.proxy_headers_read,
            "proxy_header_errors": dict(self.proxy_header_errors),
            "log_lines_dropped": self.log_lines_dropped,
            **{f"service_{key.replace(' ', '_')}": n for key, n in self.service_bytes.items()},
        }


_NAMES = tuple(f.name for f in dataclasses.fields(Counters))


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One moment of the service (or of the supervisor's sums), for one scrape."""

    counters: Counters  # every total, the open connections' bytes included
    connections: int  # open now
    listeners: int  # echo listeners accepting now
    accept_paused: bool
    udp: bool = False  # export the UDP series: UDP is configured, or has counted
    proxy: bool = False  # export the PROXY series: a PROXY listener, or it has counted
    # certificate file -> its notAfter as a Unix time; None: no TLS listener
    tls_certificates: Mapping[str, float] | None = None
