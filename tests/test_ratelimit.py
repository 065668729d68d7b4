"""UdpLimiter on numbers alone: token buckets per source and in total, the LRU bound, reports.

The clock is a plain number passed in (the limiter has none of its own).
"""

from __future__ import annotations

import dataclasses
import sys

import pytest

from epolld.config import UdpConfig
from epolld.udp.ratelimit import (
    BYTE_RATE,
    MAX_REPORTS_PER_INTERVAL,
    RATE,
    REPORT_INTERVAL_S,
    SOURCE_PORT,
    TOTAL_RATE,
    Report,
    UdpLimiter,
)

# Only the limit under test is on in each test.
OFF = UdpConfig(rate=0, burst=1, byte_rate_bytes=0, total_rate=0, refuse_source_ports=())


def answered(limiter: UdpLimiter, count: int, now: float, source: str = "192.0.2.1",
             size: int = 10) -> int:  # fmt: skip
    """How many of count datagrams, all at time now, the limiter lets through."""
    return sum(limiter.admit(source, 40000, size, now) is None for _ in range(count))


def test_everything_passes_with_every_limit_off() -> None:
    """With every rate 0 and no refused port, no datagram is dropped and nothing is tracked."""
    limiter = UdpLimiter(OFF, now=0.0)
    assert answered(limiter, 100_000, now=0.0) == 100_000
    assert limiter.admit("192.0.2.1", 0, 65507, 0.0) is None
    assert len(limiter) == 0


def test_defaults_refuse_the_loop_and_amplifier_ports() -> None:
    """Every default refused port (chargen 19, echo 7, 0, ...) is dropped as source_port."""
    limiter = UdpLimiter(UdpConfig(), now=0.0)
    for port in (0, 7, 13, 17, 19, 37, 53, 111, 123, 161, 389, 1900, 11211):
        assert limiter.admit("192.0.2.1", port, 1, 0.0) == SOURCE_PORT
    assert limiter.admit("192.0.2.1", 20, 1, 0.0) is None
    assert limiter.admit("192.0.2.1", 1024, 1, 0.0) is None


def test_source_rate_allows_burst_then_rate() -> None:
    """One source gets its burst at once, then `rate` datagrams per second, never more."""
    limiter = UdpLimiter(dataclasses.replace(OFF, rate=10, burst=5), now=0.0)
    assert answered(limiter, 100, now=0.0) == 5
    assert answered(limiter, 100, now=0.5) == 5  # 0.5 s x 10/s
    assert answered(limiter, 100, now=10.0) == 5  # refilled to the burst, not to 95
    assert answered(limiter, 100, now=10.25) == 2  # 2.5 tokens
    assert answered(limiter, 100, now=10.3) == 1  # the half token left, plus half of 0.05 s
    assert limiter.admit("192.0.2.1", 40000, 10, 10.3) == RATE


def test_sources_have_separate_buckets() -> None:
    """A source over its rate does not take the replies of another source."""
    limiter = UdpLimiter(dataclasses.replace(OFF, rate=1, burst=3), now=0.0)
    assert answered(limiter, 10_000, now=0.0, source="192.0.2.1") == 3
    assert answered(limiter, 10, now=0.0, source="192.0.2.2") == 3


def test_fractional_rate() -> None:
    """A rate of 0.5 answers one datagram every two seconds after the burst."""
    limiter = UdpLimiter(dataclasses.replace(OFF, rate=0.5, burst=1), now=0.0)
    assert [answered(limiter, 5, now=t) for t in (0.0, 1.0, 2.0, 3.0, 4.0)] == [1, 0, 1, 0, 1]


def test_byte_rate() -> None:
    """A source gets at most byte_rate bytes per second; its bucket holds one second's worth."""
    settings = dataclasses.replace(OFF, byte_rate_bytes=1000, max_datagram_bytes=100)
    limiter = UdpLimiter(settings, now=0.0)
    assert answered(limiter, 100, now=0.0, size=100) == 10
    assert limiter.admit("192.0.2.1", 40000, 100, 0.0) == BYTE_RATE
    assert limiter.admit("192.0.2.1", 40000, 0, 0.0) is None  # an empty datagram costs nothing
    assert answered(limiter, 100, now=0.25, size=100) == 2  # 250 bytes: two of 100
    assert answered(limiter, 100, now=100.0, size=100) == 10  # not more than one second's worth


def test_byte_bucket_holds_at_least_one_max_datagram() -> None:
    """With byte_rate below max_datagram, a datagram of max_datagram bytes still passes."""
    settings = dataclasses.replace(OFF, byte_rate_bytes=1000, max_datagram_bytes=9000)
    limiter = UdpLimiter(settings, now=0.0)
    assert limiter.admit("192.0.2.1", 40000, 9000, 0.0) is None
    assert limiter.admit("192.0.2.1", 40000, 9000, 8.0) == BYTE_RATE  # 8,000 bytes refilled
    assert limiter.admit("192.0.2.1", 40000, 9000, 9.0) is None


def test_total_rate_caps_replies_over_all_sources() -> None:
    """Many sources, each within its own rate, together get no more than total_rate."""
    limiter = UdpLimiter(dataclasses.replace(OFF, rate=100, burst=100, total_rate=50), now=0.0)
    results = [limiter.admit(f"10.0.{i // 256}.{i % 256}", 40000, 1, 0.0) for i in range(1000)]
    assert results.count(None) == 50
    assert set(results) == {None, TOTAL_RATE}
    assert sum(limiter.admit(f"10.1.0.{i}", 40000, 1, 0.1) is None for i in range(100)) == 5


def test_datagram_dropped_by_its_source_costs_no_total_token() -> None:
    """A source over its own rate does not use up the total bucket that others need."""
    limiter = UdpLimiter(dataclasses.replace(OFF, rate=1, burst=1, total_rate=2), now=0.0)
    assert answered(limiter, 10_000, now=0.0, source="192.0.2.1") == 1
    assert answered(limiter, 1, now=0.0, source="192.0.2.2") == 1


def test_datagram_dropped_by_the_total_costs_no_source_token() -> None:
    """A datagram refused by the total bucket leaves its source's bucket as it was."""
    settings = dataclasses.replace(OFF, rate=0.001, burst=2, total_rate=1)
    limiter = UdpLimiter(settings, now=0.0)
    assert limiter.admit("192.0.2.1", 40000, 1, 0.0) is None
    assert limiter.admit("192.0.2.1", 40000, 1, 0.0) == TOTAL_RATE
    assert limiter.admit("192.0.2.1", 40000, 1, 1.0) is None  # its second token was kept
    assert limiter.admit("192.0.2.1", 40000, 1, 1.0) == RATE


def test_source_table_is_bounded_by_sources() -> None:
    """50,000 distinct (forged) sources never make the table hold more than `sources`."""
    limiter = UdpLimiter(dataclasses.replace(OFF, rate=1, burst=1, sources=1000), now=0.0)
    for i in range(50_000):
        limiter.admit(f"127.{i >> 16}.{(i >> 8) & 255}.{i & 255}", 40000, 1, i * 1e-4)
        assert len(limiter) <= 1000
    assert len(limiter) == 1000


def test_source_table_memory_stays_bounded() -> None:
    """The table's memory after 50,000 sources is that of `sources` entries, not of 50,000."""
    settings = dataclasses.replace(OFF, rate=1, burst=1, byte_rate_bytes=1000, sources=1000)
    limiter = UdpLimiter(settings, now=0.0)

    def footprint() -> int:
        table = limiter._sources
        return sys.getsizeof(table) + sum(
            sys.getsizeof(k) + sys.getsizeof(v) for k, v in table.items()
        )

    for i in range(1000):
        limiter.admit(f"127.0.{i >> 8}.{i & 255}", 40000, 1, 0.0)
    full = footprint()
    for i in range(50_000):
        limiter.admit(f"127.1.{i >> 8}.{i & 255}", 40000, 1, 1.0)
    assert footprint() <= full * 1.5  # longer address texts; 50x without the bound


def test_least_recently_seen_source_is_forgotten() -> None:
    """When the table is full, the source not seen for longest loses its state first."""
    limiter = UdpLimiter(dataclasses.replace(OFF, rate=1, burst=1, sources=2), now=0.0)
    assert limiter.admit("192.0.2.1", 40000, 1, 0.0) is None
    assert limiter.admit("192.0.2.2", 40000, 1, 0.0) is None
    assert limiter.admit("192.0.2.1", 40000, 1, 0.0) == RATE  # .1 is now the most recent
    assert limiter.admit("192.0.2.3", 40000, 1, 0.0) is None  # evicts .2, not .1
    assert limiter.admit("192.0.2.1", 40000, 1, 0.0) == RATE  # still remembered
    assert limiter.admit("192.0.2.2", 40000, 1, 0.0) is None  # forgotten: a full bucket


def test_configure_applies_smaller_limits_at_once() -> None:
    """A reload with a smaller burst, rate and table takes effect on the next datagram."""
    settings = dataclasses.replace(OFF, rate=100, burst=100, sources=10, total_rate=1000)
    limiter = UdpLimiter(settings, now=0.0)
    for i in range(10):
        limiter.admit(f"192.0.2.{i}", 40000, 1, 0.0)
    smaller = dataclasses.replace(settings, rate=1, burst=2, sources=3, total_rate=3)
    limiter.configure(smaller, now=0.0)
    assert len(limiter) == 3
    assert answered(limiter, 100, now=0.0, source="192.0.2.9") == 2  # cut from 99 to 2
    assert answered(limiter, 100, now=0.0, source="192.0.2.8") == 1  # the total's last token


def test_configure_turns_limits_and_ports_on_and_off() -> None:
    """Turning a rate off lets everything through at once; a new refused port applies at once."""
    limiter = UdpLimiter(dataclasses.replace(OFF, rate=1, burst=1), now=0.0)
    assert answered(limiter, 10, now=0.0) == 1
    limiter.configure(dataclasses.replace(OFF, refuse_source_ports=(40000,)), now=0.0)
    assert answered(limiter, 10, now=0.0) == 0
    assert len(limiter) == 0
    limiter.configure(OFF, now=0.0)
    assert answered(limiter, 10, now=0.0) == 10


def test_rate_limited_source_is_reported_at_most_once_per_interval() -> None:
    """Drops from one source are reported once, then once per 10 s with the count in between."""
    limiter = UdpLimiter(dataclasses.replace(OFF, rate=1, burst=1), now=0.0)
    answered(limiter, 1001, now=0.0)  # 1 answered, 1,000 dropped
    assert limiter.take_reports() == ([Report("192.0.2.1", RATE, 1)], 0)
    answered(limiter, 100, now=REPORT_INTERVAL_S / 2)
    assert limiter.take_reports() == ([], 0)
    answered(limiter, 1, now=REPORT_INTERVAL_S)  # answered: refilled
    answered(limiter, 1, now=REPORT_INTERVAL_S)  # dropped, and reported with the count
    assert limiter.take_reports() == ([Report("192.0.2.1", RATE, 1099)], 0)


def test_reports_are_bounded_per_interval() -> None:
    """Forged sources over their rate do not flood the log: the excess is only counted."""
    limiter = UdpLimiter(dataclasses.replace(OFF, rate=1, burst=1), now=0.0)
    for i in range(100):
        answered(limiter, 2, now=0.0, source=f"10.0.0.{i}")
    reports, unreported = limiter.take_reports()
    assert len(reports) == MAX_REPORTS_PER_INTERVAL
    assert unreported == 100 - MAX_REPORTS_PER_INTERVAL


def test_total_rate_drops_are_reported_once_per_interval() -> None:
    """Drops by the total bucket are reported with source "" at most once per 10 s."""
    limiter = UdpLimiter(dataclasses.replace(OFF, total_rate=1), now=0.0)
    assert answered(limiter, 50, now=0.0) == 1
    assert limiter.take_reports() == ([Report("", TOTAL_RATE, 1)], 0)
    assert answered(limiter, 50, now=REPORT_INTERVAL_S) == 1
    # 48 more at 0.0 after the first report, and the first drop at 10.0 that reports them.
    assert limiter.take_reports() == ([Report("", TOTAL_RATE, 48 + 1)], 0)


@pytest.mark.parametrize("size", [0, 1, 65507])
def test_sizes_at_the_edges_pass_a_fresh_source(size: int) -> None:
    """A new source's first datagram passes at any size up to max_datagram, with defaults."""
    limiter = UdpLimiter(UdpConfig(), now=0.0)
    assert limiter.admit("2001:db8::1", 50000, size, 0.0) is None
