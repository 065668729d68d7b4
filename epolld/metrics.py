"""The Prometheus endpoint: a collector over the service's counters, its pages, its handlers.

Nothing here runs on the echo path. The collector reads the service's Counters and a
Snapshot of its live values when a scrape asks (prometheus_client's "custom collector"),
so no metric object is touched per event. HTTP is served on the daemon's own reactor:
MetricsListener accepts at most MAX_CLIENTS clients, each a MetricsClient that reads a
bounded amount per event, answers through http11.HttpConversation, writes with
backpressure (EPOLLOUT only while output waits) and is closed at its deadline.

Importing this module loads prometheus_client (about 12 MiB with what it imports: ssl,
http.server, threading), so the service imports it only when metrics.listen is set.
"""

from __future__ import annotations

import html
import select
from collections.abc import Callable, Iterable, Iterator

import structlog
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from epolld import __version__
from epolld.counters import DURATION_BUCKETS_S, Snapshot
from epolld.http11 import Reply, Request

log = structlog.get_logger("epolld")

MAX_CLIENTS = 16  # metrics clients at once; more are accepted and closed at once
REQUEST_TIMEOUT_S = 5.0  # to receive and answer a request, from connect or the last answer
RECV_BYTES = 16 * 1024  # per event: above the 8 KiB head limit, so one read can show it
ACCEPT_PER_EVENT = MAX_CLIENTS + 4  # bounded work per wakeup; the rest waits for the next
LISTEN_BACKLOG = MAX_CLIENTS
REFUSED_WARNING_EVERY_S = 10.0
ALLOWED_METHODS = "GET, HEAD"
EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT

Snapshotter = Callable[[], Snapshot]


# --- what is measured -------------------------------------------------------------------


class EchoCollector(Collector):
    """The epolld_* metrics, built from one Snapshot per scrape.

    Args:
        snapshot: returns the service's counters and live values; called once per scrape.
        version: the value of epolld_build_info's version label.
    """

    def __init__(self, snapshot: Snapshotter, version: str = __version__) -> None:
        self._snapshot = snapshot
        self._version = version

    def collect(self) -> Iterable[Metric]:
        return list(self._families(self._snapshot()))

    def _families(self, s: Snapshot) -> Iterator[Metric]:
        c = s.counters
        info = GaugeMetricFamily(
            "epolld_build_info", "The running epolld's version (always 1).", labels=["version"]
        )
        info.add_metric([self._version], 1)
        yield info
        yield GaugeMetricFamily(
            "epolld_connections", "Client connections open now.", value=s.connections
        )
        yield CounterMetricFamily(
            "epolld_connections_accepted_total",
            "Client connections accepted and served.",
            value=c.accepted,
        )
        yield _labelled(
            CounterMetricFamily(
                "epolld_connections_refused_total",
                "Client connections closed at accept because a limit was reached.",
                labels=["limit"],
            ),
            c.refused,
        )
        yield _labelled(
            CounterMetricFamily(
                "epolld_connections_closed_total",
                "Served client connections closed, by reason.",
                labels=["reason"],
            ),
            c.closed,
        )
        yield CounterMetricFamily(
            "epolld_received_bytes_total",
            "Bytes received from clients.",
            value=s.bytes_received,
            unit="bytes",
        )
        yield CounterMetricFamily(
            "epolld_sent_bytes_total", "Bytes echoed to clients.", value=s.bytes_sent, unit="bytes"
        )
        yield _histogram(
            HistogramMetricFamily(
                "epolld_connection_duration_seconds",
                "How long served client connections were open, observed at close.",
                unit="seconds",
            ),
            c.durations.counts,
            c.durations.sum_s,
        )
        yield GaugeMetricFamily(
            "epolld_accept_paused",
            "1 while accepting is paused for want of descriptors or memory.",
            value=int(s.accept_paused),
        )
        yield GaugeMetricFamily(
            "epolld_listeners", "Echo listeners accepting now.", value=s.listeners
        )
        yield _labelled(
            CounterMetricFamily(
                "epolld_config_reloads_total",
                "Configuration reloads, by result.",
                labels=["result"],
            ),
            c.reloads,
        )
        yield GaugeMetricFamily(
            "epolld_config_last_reload_successful",
            "0 if the last reload failed (the previous configuration runs), else 1.",
            value=int(c.last_reload_ok),
        )
        if c.udp is not None:
            yield CounterMetricFamily(
                "epolld_udp_datagrams_received_total",
                "UDP datagrams received.",
                value=c.udp.datagrams_received,
            )
            yield CounterMetricFamily(
                "epolld_udp_datagrams_sent_total",
                "UDP datagrams echoed.",
                value=c.udp.datagrams_sent,
            )
            yield _labelled(
                CounterMetricFamily(
                    "epolld_udp_datagrams_dropped_total",
                    "UDP datagrams not echoed, by reason.",
                    labels=["reason"],
                ),
                c.udp.dropped,
            )
        if c.proxy_header_errors is not None:
            yield _labelled(
                CounterMetricFamily(
                    "epolld_proxy_header_errors_total",
                    "Connections closed for an invalid PROXY protocol header, by reason.",
                    labels=["reason"],
                ),
                c.proxy_header_errors,
            )


def _labelled(family: CounterMetricFamily, values: dict[str, int]) -> CounterMetricFamily:
    for label, value in values.items():
        family.add_metric([label], value)
    return family


def _histogram(
    family: HistogramMetricFamily, counts: list[int], sum_s: float
) -> HistogramMetricFamily:
    """Add the cumulative buckets Prometheus expects from per-bucket counts."""
    buckets: list[tuple[str, float]] = []
    total = 0
    for bound, count in zip((*DURATION_BUCKETS_S, float("inf")), counts, strict=True):
        total += count
        buckets.append((floatToGoString(bound), total))  # type: ignore[no-untyped-call]
    family.add_metric([], buckets, sum_s)
    return family


# --- what is served ---------------------------------------------------------------------


def _index_page() -> bytes:
    version = html.escape(__version__)
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>epolld</title></head>\n'
        f"<body><h1>epolld {version}</h1>\n"
        '<p>An RFC 862 echo daemon. Prometheus metrics: <a href="/metrics">/metrics</a></p>\n'
        "</body></html>\n"
    ).encode()


class MetricsApp:
    """Routes requests: /metrics, the index page, 404 and 405.

    Args:
        snapshot: the service's Snapshot, read once per scrape.
    """

    def __init__(self, snapshot: Snapshotter) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(EchoCollector(snapshot))
        ProcessCollector(registry=self.registry)
        self._index = _index_page()

    def respond(self, request: Request) -> Reply:
        """The reply to one request; HEAD is answered as GET (the conversation drops the body)."""
        if request.path not in ("/metrics", "/"):
            return Reply(404, "text/plain; charset=utf-8", b"Not found: try /metrics\n")
        if request.method not in ("GET", "HEAD"):
            return Reply(
                405,
                "text/plain; charset=utf-8",
                b"Method not allowed: GET or HEAD\n",
                (("Allow", ALLOWED_METHODS),),
            )
        if request.path == "/":
            return Reply(200, "text/html; charset=utf-8", self._index)
        encode, content_type = choose_encoder(request.accept)
        return Reply(200, content_type, encode(self.registry))
