"""The collector: names, labels, units and values, read from a Snapshot at scrape time."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from epolld import __version__
from epolld.core.counters import DURATION_BUCKETS_S, Counters, Snapshot
from epolld.observability.metrics import EchoCollector

ISSUE_NAMES = {
    "epolld_build_info",
    "epolld_connections",
    "epolld_connections_accepted_total",
    "epolld_connections_refused_total",
    "epolld_connections_closed_total",
    "epolld_received_bytes_total",
    "epolld_sent_bytes_total",
    "epolld_connection_duration_seconds_bucket",
    "epolld_connection_duration_seconds_count",
    "epolld_connection_duration_seconds_sum",
    "epolld_accept_paused",
    "epolld_listeners",
    "epolld_config_reloads_total",
    "epolld_config_last_reload_successful",
    # Always exported since issue 20: log lines no output took (journald away, a full disk).
    "epolld_log_lines_dropped_total",
}


def scrape(snapshot: Snapshot) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Render through prometheus_client and parse it back: sample name and labels -> value."""
    registry = CollectorRegistry()
    registry.register(EchoCollector(lambda: snapshot))
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_names_are_the_issue_s() -> None:
    """Every name the issue lists is exported, and no UDP or PROXY series without them."""
    samples = scrape(Snapshot(Counters(), 0, 1, False))
    assert {name for name, _ in samples} == ISSUE_NAMES


def test_values_come_from_the_snapshot() -> None:
    """Gauges and counters carry the snapshot's values, labelled as documented."""
    counters = Counters(accepted=7, bytes_received=1234 - 100, bytes_sent=1200 - 90)
    counters.count_refused("max_connections_per_ip")
    counters.count_close("reset", 2.0, 100, 90)
    counters.count_reload(ok=True)
    counters.count_reload(ok=False)
    samples = scrape(Snapshot(counters, 4, 2, True))
    assert samples[("epolld_connections", ())] == 4
    assert samples[("epolld_connections_accepted_total", ())] == 7
    assert (
        samples[("epolld_connections_refused_total", (("limit", "max_connections_per_ip"),))] == 1
    )
    assert samples[("epolld_connections_refused_total", (("limit", "max_connections"),))] == 0
    assert samples[("epolld_connections_closed_total", (("reason", "reset"),))] == 1
    assert samples[("epolld_connections_closed_total", (("reason", "eof"),))] == 0
    assert samples[("epolld_received_bytes_total", ())] == 1234
    assert samples[("epolld_sent_bytes_total", ())] == 1200
    assert samples[("epolld_accept_paused", ())] == 1
    assert samples[("epolld_listeners", ())] == 2
    assert samples[("epolld_config_reloads_total", (("result", "success"),))] == 1
    assert samples[("epolld_config_reloads_total", (("result", "failure"),))] == 1
    assert samples[("epolld_config_last_reload_successful", ())] == 0
    assert samples[("epolld_build_info", (("version", __version__),))] == 1


def test_duration_histogram_is_cumulative_with_le_semantics() -> None:
    """Buckets count durations at or below their bound, +Inf counts all, sum is in seconds."""
    counters = Counters()
    for seconds in (0.001, 0.5, 0.5000001, 100000.0):
        counters.durations.observe(seconds)
    samples = scrape(Snapshot(counters, 0, 1, False))

    def bucket(le: str) -> float:
        return samples[("epolld_connection_duration_seconds_bucket", (("le", le),))]

    assert bucket("0.005") == 1
    assert bucket("0.5") == 2  # 0.5 itself is in the 0.5 bucket
    assert bucket("1.0") == 3
    assert bucket(str(DURATION_BUCKETS_S[-1])) == 3
    assert bucket("+Inf") == 4
    assert samples[("epolld_connection_duration_seconds_count", ())] == 4
    assert abs(samples[("epolld_connection_duration_seconds_sum", ())] - 100001.0010001) < 1e-6


def test_udp_and_proxy_series_appear_when_the_service_has_them() -> None:
    """UDP and PROXY counters are exported once the service has UDP or PROXY listeners."""
    counters = Counters(
        udp_received=5,
        udp_echoed=4,
        udp_dropped={"rate": 1},
        proxy_header_errors={"v1_malformed": 2},
    )
    snapshot = Snapshot(counters, 0, 1, False, udp=True, proxy=True)
    samples = scrape(snapshot)
    assert samples[("epolld_udp_datagrams_received_total", ())] == 5
    assert samples[("epolld_udp_datagrams_sent_total", ())] == 4
    assert samples[("epolld_udp_datagrams_dropped_total", (("reason", "rate"),))] == 1
    assert samples[("epolld_proxy_header_errors_total", (("reason", "v1_malformed"),))] == 2


def test_collector_reads_at_scrape_time() -> None:
    """A counter changed after the collector was registered shows in the next scrape."""
    counters = Counters()
    registry = CollectorRegistry()
    registry.register(EchoCollector(lambda: Snapshot(counters, 0, 1, False)))
    assert b"epolld_connections_accepted_total 0.0" in generate_latest(registry)
    counters.accepted += 1
    assert b"epolld_connections_accepted_total 1.0" in generate_latest(registry)
