"""Counters, the one list of totals: arithmetic, records, and the records of earlier code."""

from __future__ import annotations

import json
from typing import Any

from epolld.core.counters import DURATION_BUCKETS_S, Counters, DurationHistogram

# A single process's handoff record as the code before the one list of totals wrote it
# (main at 72c99cf): dataclasses.asdict(Counters) and the UDP totals beside it.
OLD_COUNTERS: dict[str, Any] = {
    "accepted": 7,
    "refused": {"max_connections": 1, "max_connections_per_ip": 2},
    "closed": {"eof": 5, "reset": 1, "error": 0, "idle_timeout": 0, "shutdown": 0},
    "bytes_received": 1000,
    "bytes_sent": 990,
    "durations": {"counts": [1, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0], "sum_s": 2.5},
    "reloads": {"success": 2, "failure": 1},
    "last_reload_ok": False,
}
OLD_UDP: dict[str, Any] = {
    "received": 9,
    "echoed": 8,
    "icmp_errors": 1,
    "dropped": {"rate": 1, "truncated": 0},
}


def busy() -> Counters:
    totals = Counters(accepted=3, udp_received=4, proxy_headers_read=2)
    totals.count_close("eof", 0.2, 10, 9)
    totals.count_refused("max_connections")
    totals.udp_dropped["rate"] = 1
    totals.proxy_header_errors["timeout"] = 5
    return totals


def test_record_round_trips_through_json() -> None:
    """to_dict() is JSON-safe and from_dict() gives the same totals back."""
    totals = busy()
    assert Counters.from_dict(json.loads(json.dumps(totals.to_dict()))) == totals


def test_add_then_subtract_is_the_identity() -> None:
    """add() sums every kind of field (ints, labelled dicts, the histogram); subtract()
    takes the same away."""
    total = busy()
    total.add(busy())
    assert total.accepted == 6
    assert total.closed["eof"] == 2
    assert total.durations.counts == [2 * n for n in busy().durations.counts]
    assert total.proxy_header_errors["timeout"] == 10
    assert total.udp_dropped["rate"] == 2
    total.subtract(busy())
    assert total == busy()


def test_restore_keeps_the_objects_others_hold() -> None:
    """restore() adds in place: a dict handed out before (HeaderErrors holds one) counts on."""
    totals = Counters()
    errors = totals.proxy_header_errors
    totals.restore(busy().to_dict())
    errors["timeout"] += 1
    assert totals.proxy_header_errors["timeout"] == 6


def test_old_records_restore_with_their_udp_totals() -> None:
    """A record written before the one list of totals restores every total it held, the
    UDP totals from their separate dict."""
    totals = Counters.from_dict(OLD_COUNTERS, OLD_UDP)
    assert totals.accepted == 7
    assert totals.refused == OLD_COUNTERS["refused"]
    assert totals.closed["eof"] == 5
    assert (totals.bytes_received, totals.bytes_sent) == (1000, 990)
    assert totals.durations == DurationHistogram([1, 2, 3] + [0] * 9, 2.5)
    assert totals.reloads == {"success": 2, "failure": 1}
    assert totals.last_reload_ok is False
    assert (totals.udp_received, totals.udp_echoed, totals.udp_icmp_errors) == (9, 8, 1)
    assert totals.udp_dropped == {"rate": 1, "truncated": 0}


def test_new_record_reads_back_as_earlier_code_expects() -> None:
    """A new record keeps the old fields' names and shapes, and legacy_udp() the UDP dict."""
    record = Counters.from_dict(OLD_COUNTERS, OLD_UDP).to_dict()
    assert {k: record[k] for k in OLD_COUNTERS} == OLD_COUNTERS
    assert Counters.from_dict(OLD_COUNTERS, OLD_UDP).legacy_udp() == OLD_UDP


def test_unknown_and_malformed_fields_are_ignored() -> None:
    """A field this version does not know, or of another shape, leaves that total at 0."""
    totals = Counters.from_dict({"accepted": 2, "from_the_future": 1, "closed": "garbage"})
    assert totals.accepted == 2
    assert totals.closed == Counters().closed


def test_histogram_with_other_buckets_keeps_its_count() -> None:
    """More buckets than ours: the extra counts go to +Inf, so count and sum stay."""
    counts = [1] * (len(DURATION_BUCKETS_S) + 3)
    hist = DurationHistogram.from_dict({"counts": counts, "sum_s": 1.0})
    assert sum(hist.counts) == len(counts)
    assert hist.counts[-1] == 3  # its own and the 2 beyond ours


def test_stats_fields_keep_the_stats_line_names() -> None:
    """The stats line shows the totals under the names it always had."""
    fields = busy().stats_fields()
    assert (fields["accepted"], fields["refused"], fields["bytes_in"], fields["bytes_out"]) == (
        3,
        1,
        10,
        9,
    )
    assert (fields["udp_received"], fields["udp_dropped"], fields["udp_dropped_rate"]) == (4, 1, 1)
    assert fields["proxy_headers_read"] == 2
    assert fields["proxy_header_errors"] == {"timeout": 5}
