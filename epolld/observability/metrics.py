"""The Prometheus endpoint: a collector over the service's counters, its pages, its handlers.

Nothing here runs on the echo path. The collector reads a Snapshot (the service's totals
and its live values) when a scrape asks (prometheus_client's "custom collector"),
so no metric object is touched per event. HTTP is served on the daemon's own reactor:
MetricsEndpoint accepts at most MAX_CLIENTS clients, each a MetricsClient that reads a
bounded amount per event, answers through http11.HttpConversation, writes with
backpressure (EPOLLOUT only while output waits) and is closed at its deadline.

Importing this module loads prometheus_client (about 12 MiB with what it imports: ssl,
http.server, threading), so the service imports it only when metrics.listen is set.
"""

from __future__ import annotations

import html
import select
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping

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
from epolld.config import ListenAddress
from epolld.core.counters import DURATION_BUCKETS_S, Snapshot
from epolld.core.loop import CLOSE, Handler, Reactor
from epolld.errors import BindError
from epolld.listening import sockets
from epolld.listening.endpoint import Endpoint, EndpointClient
from epolld.listening.sockets import Listener
from epolld.observability import health
from epolld.observability.http11 import HttpConversation, Reply, Request

log = structlog.get_logger("epolld")

MAX_CLIENTS = 16  # metrics clients at once; more are accepted and closed at once
REQUEST_TIMEOUT_S = 5.0  # to receive and answer a request, from connect or the last answer
RECV_BYTES = 16 * 1024  # per event: above the 8 KiB head limit, so one read can show it
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
            value=c.bytes_received,
            unit="bytes",
        )
        yield CounterMetricFamily(
            "epolld_sent_bytes_total", "Bytes echoed to clients.", value=c.bytes_sent, unit="bytes"
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
        yield CounterMetricFamily(
            "epolld_log_lines_dropped_total",
            "Log lines dropped because stdout, the journal or the log file took none.",
            value=c.log_lines_dropped,
        )
        if s.udp:
            yield CounterMetricFamily(
                "epolld_udp_datagrams_received_total",
                "UDP datagrams received.",
                value=c.udp_received,
            )
            yield CounterMetricFamily(
                "epolld_udp_datagrams_sent_total",
                "UDP datagrams echoed.",
                value=c.udp_echoed,
            )
            yield _labelled(
                CounterMetricFamily(
                    "epolld_udp_datagrams_dropped_total",
                    "UDP datagrams not echoed, by reason.",
                    labels=["reason"],
                ),
                c.udp_dropped,
            )
        if s.proxy:
            yield _labelled(
                CounterMetricFamily(
                    "epolld_proxy_header_errors_total",
                    "Connections closed for an invalid PROXY protocol header, by reason.",
                    labels=["reason"],
                ),
                c.proxy_header_errors,
            )
        if c.tls_handshakes:
            yield _labelled(
                CounterMetricFamily(
                    "epolld_tls_handshakes_total",
                    "TLS handshakes finished, by result.",
                    labels=["result"],
                ),
                c.tls_handshakes,
            )
            yield _labelled(
                CounterMetricFamily(
                    "epolld_tls_handshake_failures_total",
                    "TLS handshakes that failed (the connection closed unechoed), by reason.",
                    labels=["reason"],
                ),
                c.tls_handshake_failures,
            )
            yield _histogram(
                HistogramMetricFamily(
                    "epolld_tls_handshake_duration_seconds",
                    "How long successful TLS handshakes took, from accept (or the end of a"
                    " PROXY header).",
                    unit="seconds",
                ),
                c.tls_handshake_durations.counts,
                c.tls_handshake_durations.sum_s,
            )
        if c.service_bytes:
            yield _service_bytes(c.service_bytes)
        if c.faults:
            yield _labelled(
                CounterMetricFamily(
                    "epolld_faults_total",
                    "Faults injected by fault listeners, by kind (delay and bandwidth: chunks"
                    " or datagrams held back; close and reset: connections ended; drop:"
                    " datagrams not answered).",
                    labels=["kind"],
                ),
                c.faults,
            )
        if s.tls_certificates is not None:
            expiry = GaugeMetricFamily(
                "epolld_tls_certificate_expiry_seconds",
                "When each served certificate expires (notAfter), as a Unix time.",
                labels=["certificate"],
            )
            for path, not_after in sorted(s.tls_certificates.items()):
                expiry.add_metric([path], not_after)
            yield expiry


def _labelled(family: CounterMetricFamily, values: Mapping[str, int]) -> CounterMetricFamily:
    for label, value in values.items():
        family.add_metric([label], value)
    return family


def _service_bytes(counts: Mapping[str, int]) -> CounterMetricFamily:
    """epolld_service_bytes_total{transport,service,direction} (services/)."""
    family = CounterMetricFamily(
        "epolld_service_bytes_total",
        "Bytes the discard, chargen and info services received and sent.",
        labels=["transport", "service", "direction"],
    )
    for key, value in sorted(counts.items()):
        family.add_metric(key.split(" ", 2), value)
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
        '<p>An RFC 862 echo daemon. Prometheus metrics: <a href="/metrics">/metrics</a>;'
        ' health: <a href="/healthz">/healthz</a>, <a href="/readyz">/readyz</a></p>\n'
        "</body></html>\n"
    ).encode()


class MetricsApp:
    """Routes requests: /metrics, /healthz and /readyz (health.py), the index page, 404
    and 405.

    Args:
        snapshot: the service's Snapshot, read once per scrape.
        live, ready: the process's health checks (None: all is well, else why not).
    """

    def __init__(
        self,
        snapshot: Snapshotter,
        live: health.Check = lambda: None,
        ready: health.Check = lambda: None,
    ) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(EchoCollector(snapshot))
        ProcessCollector(registry=self.registry)
        self._index = _index_page()
        self._live = live
        self._ready = ready

    def respond(self, request: Request) -> Reply:
        """The reply to one request; HEAD is answered as GET (the conversation drops the body)."""
        if request.path not in ("/metrics", "/", *health.PATHS):
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
        answer = health.reply(request.path, self._live, self._ready)
        if answer is not None:
            return answer
        encode, content_type = choose_encoder(request.accept)
        return Reply(200, content_type, encode(self.registry))


# --- how it is served -------------------------------------------------------------------


class MetricsEndpoint(Endpoint):
    """The metrics listener and its clients, on the daemon's reactor (listening/endpoint.py).

    At most MAX_CLIENTS clients are served at once; one more is accepted and closed at
    once, so that it does not wait in the backlog.

    Args:
        reactor: the daemon's reactor; the endpoint registers its handlers there.
        listener: the bound listening socket; the endpoint owns it from now on.
        app: routes and renders requests.
    """

    accept_per_event = MAX_CLIENTS + 4
    paused_event = "metrics_accept_paused"
    failed_event = "accept_failed"  # as the echo listeners' (journald.py has its message)

    def __init__(self, reactor: Reactor, listener: Listener, app: MetricsApp) -> None:
        self._app = app
        self._refused_unlogged = 0
        self._refused_logged_at = -REFUSED_WARNING_EVERY_S
        super().__init__(reactor, listener)

    def serve(self, sock: socket.socket) -> None:
        if self.clients >= MAX_CLIENTS:
            sock.close()
            self._count_refused()
            return
        self.attach(MetricsClient(sock, self._reactor, self._app, self.forget))

    def _count_refused(self) -> None:
        self._refused_unlogged += 1
        now = self._reactor.now
        if now - self._refused_logged_at >= REFUSED_WARNING_EVERY_S:
            log.warning(
                "metrics_client_refused",
                address=self.listener.name,
                limit=MAX_CLIENTS,
                refused=self._refused_unlogged,
            )
            self._refused_unlogged = 0
            self._refused_logged_at = now


class MetricsClient(EndpointClient):
    """One HTTP client of the metrics endpoint, as a reactor handler.

    Level-triggered: one recv() per event while a request is wanted, one send() per event
    while a response waits (EPOLLOUT only then), so each event does bounded work. Each
    request must arrive and be answered within REQUEST_TIMEOUT_S of the connection or of
    the previous answer, or the client is closed.
    """

    __slots__ = ("_answered", "_conv")

    timeout_s = REQUEST_TIMEOUT_S

    def __init__(
        self,
        sock: socket.socket,
        reactor: Reactor,
        app: MetricsApp,
        forget: Callable[[Handler], None],
    ) -> None:
        super().__init__(sock, reactor, forget)
        self._conv = HttpConversation(app.respond)
        self._answered = 0

    def __repr__(self) -> str:
        return f"<MetricsClient fd={self.fd} {self._conv!r}>"

    def on_event(self, events: int) -> int:
        conv = self._conv
        if conv.reading:
            try:
                data = self.sock.recv(RECV_BYTES)
            except BlockingIOError:
                return self.mask
            except OSError:
                return CLOSE
            conv.receive(data)
        if conv.output:
            try:
                conv.sent(self.sock.send(conv.output))
            except BlockingIOError:
                pass
            except OSError:
                return CLOSE
        if conv.responses != self._answered and not conv.output:
            self._answered = conv.responses
            self.rearm()
        if conv.output:
            return EPOLLOUT
        return CLOSE if conv.closing else EPOLLIN

    def _expire(self) -> None:
        log.debug("metrics_client_timeout", fd=self.fd, timeout_s=REQUEST_TIMEOUT_S)
        super()._expire()


def bind(address: ListenAddress) -> Listener:
    """Bind the metrics endpoint's listening socket.

    Raises:
        BindError: the address cannot be bound; the message names it as the metrics one.
    """
    try:
        return sockets.bind(address, LISTEN_BACKLOG)
    except BindError as e:
        raise BindError(f"metrics.listen: {e}", errno=e.errno) from None
