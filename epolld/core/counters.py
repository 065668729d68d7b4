"""What the echo service counts, as typed objects that metrics.py reads at scrape time.

Everything here changes only at accept, close and reload, never per event: the echo hot
path pays nothing for metrics. Live values (open connections, bytes of open connections)
are not kept here; the service computes them when asked, in a Snapshot. This module
imports nothing heavy, so that the service can own a Counters whether or not metrics are on.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

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


class UdpTotals(Protocol):
    """What the UDP echo counts (epolld.udp's UdpStats), read by the metrics endpoint."""

    received: int
    echoed: int
    dropped: dict[str, int]  # by reason


@dataclass(slots=True)
class Counters:
    """Totals since start; the service updates them at accept, close and reload."""

    accepted: int = 0
    refused: dict[str, int] = field(default_factory=lambda: _zeros(REFUSE_LIMITS))
    closed: dict[str, int] = field(default_factory=lambda: _zeros(CLOSE_REASONS))
    bytes_received: int = 0  # of closed connections; open ones are added in a Snapshot
    bytes_sent: int = 0
    durations: DurationHistogram = field(default_factory=DurationHistogram)
    reloads: dict[str, int] = field(default_factory=lambda: _zeros(RELOAD_RESULTS))
    last_reload_ok: bool = True
    # TLS (tls/): empty until a TLS listener is configured, so that no series appears
    # without one.
    tls_handshakes: dict[str, int] = field(default_factory=dict)  # by result
    tls_handshake_failures: dict[str, int] = field(default_factory=dict)  # by reason
    tls_handshake_durations: DurationHistogram = field(default_factory=DurationHistogram)

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


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The service's state at one moment: its Counters and the values that live elsewhere."""

    counters: Counters
    connections: int  # open now
    bytes_received: int  # closed and open connections together
    bytes_sent: int
    listeners: int  # echo listeners accepting now
    accept_paused: bool
    udp: UdpTotals | None = None  # None: no UDP echo configured
    proxy_header_errors: Mapping[str, int] | None = None  # by reason; None: no PROXY listener
    # certificate file -> its notAfter as a Unix time; None: no TLS listener
    tls_certificates: Mapping[str, float] | None = None
