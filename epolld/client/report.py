"""What a measuring run prints: lines for people, or one JSON object for scripts and CI.

Every run produces a Report; cli.py prints its lines, or with --json one object
holding every figure plus the exit status and its meaning (also when it failed).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from typing import Any

from epolld import __version__
from epolld.client.errors import EXIT_OK, MEANINGS

PERCENTILES = (("p50", 0.50), ("p90", 0.90), ("p99", 0.99), ("p99.9", 0.999))


@dataclasses.dataclass(slots=True)
class Report:
    """The outcome of one run: text lines and the same figures as data."""

    mode: str  # "echo", "udp", "discard", "chargen" or "info"
    target: str
    lines: list[str] = dataclasses.field(default_factory=list)
    figures: dict[str, Any] = dataclasses.field(default_factory=dict)
    exit_code: int = EXIT_OK  # a run can measure to the end and still fail (a bad reply)
    problem: str | None = None  # the one-line reason when exit_code is not 0


def percentile(ordered: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending, non-empty sequence."""
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def latency_summary(latencies: Sequence[float]) -> dict[str, float] | None:
    """The count, and in milliseconds min, mean, p50, p90, p99, p99.9 and max of
    latencies in seconds."""
    if not latencies:
        return None
    ordered = sorted(latencies)
    summary: dict[str, float] = {"count": len(ordered), "min": ordered[0] * 1e3}
    summary["mean"] = sum(ordered) / len(ordered) * 1e3
    for name, fraction in PERCENTILES:
        summary[name] = percentile(ordered, fraction) * 1e3
    summary["max"] = ordered[-1] * 1e3
    return summary


def latency_line(summary: dict[str, float] | None, what: str) -> str:
    """One line: latency (what): p50 ... ms, p90 ..., p99 ..., p99.9 ..., max ... ms."""
    if summary is None:
        return f"latency ({what}): no samples"
    parts = ", ".join(f"{name} {summary[name]:.3f} ms" for name, _ in PERCENTILES)
    return f"latency ({what}): {parts}, max {summary['max']:.3f} ms"


def rate(amount: float, seconds: float) -> float:
    """amount per second (a zero elapsed time counts as a nanosecond, to stay finite)."""
    return amount / max(seconds, 1e-9)


def to_json(report: Report | None, exit_code: int, error: str | None) -> str:
    """The --json object: every figure, the exit status and what it means."""
    document: dict[str, Any] = {"client": f"epolld-client {__version__}"}
    if report is not None:
        document.update(mode=report.mode, target=report.target, **report.figures)
    document.update(
        exit_status=exit_code,
        exit_meaning=MEANINGS.get(exit_code, "unknown"),
        error=error,
    )
    return json.dumps(document, allow_nan=False)
