"""The issues' targets and their evaluation: PASS, MISS or NOT MEASURED, with the reason.

To add a target, add a Target to TARGETS; a MISS shows the reason kept under its id in
bench/reasons.json.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from typing import Any

from .paths import REASONS
from .runner import METRICS


@dataclasses.dataclass(frozen=True)
class Target:
    id: str
    text: str
    workload: str
    server: str
    metric: str  # a key of METRIC_KEY, or a summary key
    cmp: str  # <=, <, >=
    ref: str  # a server in the same workload, "@workload" (same server), or "" (absolute)
    factor: float  # the limit is ref's median times this (or this, if absolute)
    issue: int = 6


T = Target
TARGETS: list[Target] = [
    T("T1-64-c", "64 B, level: CPU/rt <= 1.15x C",
      "pp-64-c100", "epolld-level", "cpu", "<=", "c-epoll", 1.15),
    T("T1-64-uv", "64 B, level: CPU/rt < uvloop",
      "pp-64-c100", "epolld-level", "cpu", "<", "uvloop-protocol", 1.0),
    T("T1-1k-c", "1 KiB, level: CPU/rt <= 1.15x C",
      "pp-1k-c100", "epolld-level", "cpu", "<=", "c-epoll", 1.15),
    T("T1-1k-uv", "1 KiB, level: CPU/rt < uvloop",
      "pp-1k-c100", "epolld-level", "cpu", "<", "uvloop-protocol", 1.0),
    T("T2-64", "64 B: edge CPU/rt <= 1.10x level",
      "pp-64-c100", "epolld-edge", "cpu", "<=", "epolld-level", 1.1),
    T("T2-1k", "1 KiB: edge CPU/rt <= 1.10x level",
      "pp-1k-c100", "epolld-edge", "cpu", "<=", "epolld-level", 1.1),
    T("T3-copy", "16 KiB, copy (level): CPU/rt <= 1.10x C",
      "pp-16k-c100", "epolld-level", "cpu", "<=", "c-epoll", 1.1),
    T("T3-splice", "16 KiB, splice: CPU/rt <= 1.0x C",
      "pp-16k-c100", "epolld-splice", "cpu", "<=", "c-epoll", 1.0),
    T("T4-splice", "128 KiB, splice: CPU/rt <= 0.85x C",
      "pp-128k-c100", "epolld-splice", "cpu", "<=", "c-epoll", 0.85),
    T("T4-splice-rt", "128 KiB, splice: round trips/s >= C (informational)",
      "pp-128k-c100", "epolld-splice", "rtps", ">=", "c-epoll", 1.0),
    T("T4-copy", "128 KiB, copy (level): CPU/rt <= uvloop",
      "pp-128k-c100", "epolld-level", "cpu", "<=", "uvloop-protocol", 1.0),
    T("T5-level", "streaming 10 x 64 KiB, level: MB/s >= uvloop",
      "stream-64k-c10", "epolld-level", "mbps", ">=", "uvloop-protocol", 1.0),
    T("T5-edge", "streaming 10 x 64 KiB, edge: MB/s >= uvloop",
      "stream-64k-c10", "epolld-edge", "mbps", ">=", "uvloop-protocol", 1.0),
    T("T6-time", "10,000 connections, level: all established <= 0.3 s",
      "idle-10k", "epolld-level", "connect", "<=", "", 0.3),
    T("T6-rss", "10,000 connections, level: peak RSS <= 24 MiB",
      "idle-10k", "epolld-level", "rss", "<=", "", 24.0),
    T("T6-cpu", "10,000 connections, level: CPU/rt <= 1.10x 100 connections",
      "idle-10k", "epolld-level", "cpu", "<=", "@pp-1k-c100", 1.1),
    # issue 9: fairness of edge mode
    T("F1-copy", "fairness, copy: edge p99 <= 2x level p99",
      "fairness", "epolld-edge", "p99", "<=", "epolld-level", 2.0, 9),
    T("F1-splice", "fairness, splice: edge p99 <= 2x level p99",
      "fairness", "epolld-splice-edge", "p99", "<=", "epolld-splice", 2.0, 9),
    # issue 9: scale
    T("S1-level", "scale, level: all connected and echoing <= 1.1x C",
      "scale", "epolld-level", "echoing", "<=", "c-epoll", 1.1, 9),
    T("S1-edge", "scale, edge: all connected and echoing <= 1.1x C",
      "scale", "epolld-edge", "echoing", "<=", "c-epoll", 1.1, 9),
    T("S2-level", "scale, level: peak RSS above start-up <= 0.5 KiB per connection",
      "scale", "epolld-level", "kib_per_conn", "<=", "", 0.5, 9),
    T("S3-level", "10,000 connections (scale-10k), level: peak RSS <= 24 MiB",
      "scale-10k", "epolld-level", "rss", "<=", "", 24.0, 9),
    T("S4-level", "scale, level: ping-pong p99 beside the idle ones < 10 ms",
      "scale", "epolld-level", "p99", "<", "", 10_000.0, 9),
    T("S4-edge", "scale, edge: ping-pong p99 beside the idle ones < 10 ms",
      "scale", "epolld-edge", "p99", "<", "", 10_000.0, 9),
    T("S5-level", "expiry wave, level: longest probe round trip <= 100 ms",
      "scale-expiry", "epolld-level", "max", "<=", "", 100_000.0, 9),
    T("S5-edge", "expiry wave, edge: longest probe round trip <= 100 ms",
      "scale-expiry", "epolld-edge", "max", "<=", "", 100_000.0, 9),
    T("S6-splice", "10,000 connections, splice: all connected and echoing <= 1.1x C",
      "scale-10k", "epolld-splice", "echoing", "<=", "c-epoll", 1.1, 9),
    # issue 10: UDP echo, against the plain C server and uvloop's DatagramProtocol
    T("U1-64-c", "UDP 64 B, level: CPU/datagram <= 1.3x C (recvfrom/sendto)",
      "udp-64", "epolld-level", "cpu", "<=", "c-udp", 1.3, 10),
    T("U1-64-uv", "UDP 64 B, level: CPU/datagram < uvloop",
      "udp-64", "epolld-level", "cpu", "<", "uvloop-datagram", 1.0, 10),
    T("U1-1k-c", "UDP 1 KiB, level: CPU/datagram <= 1.3x C (recvfrom/sendto)",
      "udp-1k", "epolld-level", "cpu", "<=", "c-udp", 1.3, 10),
    T("U1-1k-uv", "UDP 1 KiB, level: CPU/datagram < uvloop",
      "udp-1k", "epolld-level", "cpu", "<", "uvloop-datagram", 1.0, 10),
    # issue 24: UDP in batches (recvmmsg/sendmmsg), limits off, against both C servers
    T("U2-64-c", "UDP 64 B, level: CPU/datagram <= 1.1x C (recvfrom/sendto)",
      "udp-64", "epolld-level", "cpu", "<=", "c-udp", 1.1, 24),
    T("U2-64-mmsg", "UDP 64 B, level: CPU/datagram <= 1.1x C (recvmmsg/sendmmsg)",
      "udp-64", "epolld-level", "cpu", "<=", "c-udp-mmsg", 1.1, 24),
    T("U2-64-uv", "UDP 64 B, level: CPU/datagram < uvloop",
      "udp-64", "epolld-level", "cpu", "<", "uvloop-datagram", 1.0, 24),
    T("U2-1k-c", "UDP 1 KiB, level: CPU/datagram <= 1.1x C (recvfrom/sendto)",
      "udp-1k", "epolld-level", "cpu", "<=", "c-udp", 1.1, 24),
    T("U2-1k-mmsg", "UDP 1 KiB, level: CPU/datagram <= 1.1x C (recvmmsg/sendmmsg)",
      "udp-1k", "epolld-level", "cpu", "<=", "c-udp-mmsg", 1.1, 24),
    T("U2-1k-uv", "UDP 1 KiB, level: CPU/datagram < uvloop",
      "udp-1k", "epolld-level", "cpu", "<", "uvloop-datagram", 1.0, 24),
    # issue 21: TLS echo, against Go's crypto/tls, uvloop with ssl=, socat and ncat
    T("TLS1-level", "TLS 1 KiB, level: CPU/rt <= 1.2x Go crypto/tls",
      "tls-pingpong", "epolld-level", "cpu", "<=", "go-tls", 1.2, 21),
    T("TLS1-edge", "TLS 1 KiB, edge: CPU/rt <= 1.2x Go crypto/tls",
      "tls-pingpong", "epolld-edge", "cpu", "<=", "go-tls", 1.2, 21),
    T("TLS2-level", "TLS 1 KiB, level: CPU/rt < uvloop ssl=",
      "tls-pingpong", "epolld-level", "cpu", "<", "uvloop-tls", 1.0, 21),
    T("TLS2-edge", "TLS 1 KiB, edge: CPU/rt < uvloop ssl=",
      "tls-pingpong", "epolld-edge", "cpu", "<", "uvloop-tls", 1.0, 21),
    T("TLS3-socat", "new TLS connections/s, level: ahead of socat (fork)",
      "tls-connect", "epolld-level", "rtps", ">=", "socat-tls", 1.0, 21),
    T("TLS3-ncat", "new TLS connections/s, level: ahead of ncat (fork)",
      "tls-connect", "epolld-level", "rtps", ">=", "ncat-tls", 1.0, 21),
    T("TLS4-level", "10,000 idle TLS connections, level: RSS above start-up <= 20 KiB per conn",
      "tls-idle", "epolld-level", "idle_rss_kib_per_conn", "<=", "", 20.0, 21),
    T("TLS4-edge", "10,000 idle TLS connections, edge: RSS above start-up <= 20 KiB per conn",
      "tls-idle", "epolld-edge", "idle_rss_kib_per_conn", "<=", "", 20.0, 21),
]  # fmt: skip
# issue 24: the peers an engineer would pick. epolld (level, the default) at or below Go's CPU
# per round trip on every ping-pong and scale row, and per GB streamed (CPU per chunk of a
# fixed size); tokio's ratios are reported in the tables (vs tokio), not judged.
PEER_ROWS = (
    "pp-1k-c1", "pp-1k-c10", "pp-1k-c100", "pp-1k-c1000", "pp-64-c100", "pp-16k-c100",
    "pp-128k-c100", "idle-10k", "stream-64k-c10", "scale", "scale-10k",
)  # fmt: skip
TARGETS += [
    T(f"G1-{row}", f"{row}, level: CPU/{'GB' if row.startswith('stream') else 'rt'} <= Go",
      row, "epolld-level", "cpu", "<=", "go", 1.0, 24)
    for row in PEER_ROWS
]  # fmt: skip
# issue 24: 100,000 connections (bench/run --scale-conns 100000 --workers 6; the same at 19,900
# on one process), and the restart handoff of all of them.
TARGETS += [
    T("S2-pss", "scale, level: Pss of all processes above start-up <= 0.5 KiB per connection",
      "scale", "epolld-level", "idle_pss_kib_per_conn", "<=", "", 0.5, 24),
    T("S7-level", "expiry wave, level: turns of over 100 ms (every worker, wall) = 0",
      "scale-expiry", "epolld-level", "slow_turns_measured", "<=", "", 0.0, 24),
    T("S7-edge", "expiry wave, edge: turns of over 100 ms (every worker, wall) = 0",
      "scale-expiry", "epolld-edge", "slow_turns_measured", "<=", "", 0.0, 24),
    T("S8-level", "expiry wave, level: CPU of the loop's deferred work in one turn <= 100 ms",
      "scale-expiry", "epolld-level", "longest_deferred_cpu_ms", "<=", "", 100.0, 24),
    T("H1-scale", "handoff-scale: signal to READY=1 <= 3 s",
      "handoff-scale", "epolld-level", "handoff_s", "<=", "", 3.0, 24),
]  # fmt: skip
METRIC_KEY = {
    "rtps": "round_trips_per_s",
    "cpu": "cpu_s_per_m_rt",
    "mbps": "mb_per_s",
    "connect": "connect_all_s",
    "rss": "peak_rss_mib",
    "p99": "p99_us",
    "max": "max_us",
    "echoing": "all_echoing_s",
    "kib_per_conn": "rss_per_conn_kib",
}


def _median(summary: dict[str, Any], workload: str, server: str, metric: str) -> float | None:
    entry = summary.get(workload, {}).get(server, {}).get(METRIC_KEY.get(metric, metric))
    return entry["median"] if entry else None


def _splice_inactive(summary: dict[str, Any], workload: str, server: str) -> bool:
    entry = summary.get(workload, {}).get(server)
    return bool(entry) and "splice" not in entry.get("io", ["splice"])


def _kinds(entry: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in entry["error_kinds"].items())


def _paired_ratios(raw: dict[str, Any], t: Target) -> list[float]:
    """Per-repeat ratios of server to ref: neighbours in the interleaved order, so slow drifts
    of the machine cancel out."""
    if not raw or not t.ref or t.ref.startswith("@"):
        return []
    key = METRIC_KEY.get(t.metric, t.metric)
    get = METRICS.get(key) or (lambda r: r.get(key))
    mine, theirs = raw.get(t.workload, {}).get(t.server, []), raw.get(t.workload, {}).get(t.ref, [])
    pairs = [(get(a), get(b)) for a, b in zip(mine, theirs, strict=False)]
    return [a / b for a, b in pairs if a is not None and b]


def evaluate(summary: dict[str, Any], raw: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """PASS/MISS of each target from the medians; the paired ratios show how sure that is."""
    reasons = json.loads(REASONS.read_text()) if REASONS.exists() else {}
    rows = []
    for t in TARGETS:
        value = _median(summary, t.workload, t.server, t.metric)
        row: dict[str, Any] = {"id": t.id, "target": t.text, "value": value, "issue": t.issue}
        if "splice" in t.server and _splice_inactive(summary, t.workload, t.server):
            row.update(
                status="NOT MEASURED",
                limit=None,
                value=None,
                reason="epolld accepted `io: splice` but held no pipes",
            )
            rows.append(row)
            continue
        if t.ref.startswith("@"):
            base = _median(summary, t.ref[1:], t.server, t.metric)
        elif t.ref:
            base = _median(summary, t.workload, t.ref, t.metric)
        else:
            base = 1.0
        if value is None or base is None:
            row.update(status="NOT MEASURED", limit=None)
        else:
            limit = base * t.factor
            ok = {"<=": value <= limit, "<": value < limit, ">=": value >= limit}[t.cmp]
            row.update(
                status="PASS" if ok else "MISS",
                limit=limit,
                ratio=value / base if t.ref and base else None,
            )
            paired = _paired_ratios(raw or {}, t)
            if paired:
                row["paired"] = [
                    round(statistics.median(paired), 3),
                    round(min(paired), 3),
                    round(max(paired), 3),
                ]
        if row["status"] == "MISS":
            row["reason"] = reasons.get(t.id, "not analysed yet")
        elif row["status"] == "NOT MEASURED":
            row["reason"] = "not in this run (see bench/run --full)"
        rows.append(row)
    # Zero errors, every workload, every epolld mode that ran.
    bad = [
        f"{w}/{s}: {e['errors']} ({_kinds(e) or 'run failed'})"
        for w, per in summary.items()
        for s, e in per.items()
        if s.startswith("epolld") and e["errors"]
    ]
    ran = any(s.startswith("epolld") for per in summary.values() for s in per)
    row = {
        "id": "T7",
        "target": "zero errors (lost/reordered/corrupted bytes, resets) in every workload:"
        " configurations with errors",
        "value": len(bad),
        "issue": 6,
    }
    row["status"] = "NOT MEASURED" if not ran else ("PASS" if not bad else "MISS")
    if bad:
        row["reason"] = reasons.get("T7", "not analysed yet") + " — " + "; ".join(bad)
    rows.append(row)
    return rows
