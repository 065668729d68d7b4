"""What a scenario reports: one row of the campaign's table, and whether it passed."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Row:
    scenario: str
    load: str = ""
    faults: str = ""
    bytes_verified: int = 0
    connections_lost: int = 0
    errors: int = 0
    worst_latency_ms: float = 0.0
    failures: list[str] = field(default_factory=list)  # broken promises: the campaign fails
    too_slow: list[str] = field(default_factory=list)  # missed latency bounds: fails it too
    notes: list[str] = field(default_factory=list)  # figures worth keeping beside the row

    def require(self, ok: bool, failure: str) -> None:
        if not ok:
            self.failures.append(failure)

    def require_timing(self, ok: bool, failure: str) -> None:
        """A bound on time: the campaign holds the daemon to it, the short tests in `make test`
        (on a machine of unknown speed) do not."""
        if not ok:
            self.too_slow.append(failure)

    @property
    def passed(self) -> bool:
        return not self.failures and not self.too_slow


HEADER = (
    "| Scenario | Load held | Faults injected | Bytes verified | Connections lost | Errors"
    " | Worst latency | Result |"
)


def table(rows: list[Row]) -> str:
    lines = [HEADER, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        result = "pass" if r.passed else "FAIL"
        lines.append(
            f"| {r.scenario} | {r.load} | {r.faults} | {r.bytes_verified:,} | {r.connections_lost}"
            f" | {r.errors} | {r.worst_latency_ms:,.1f} ms | {result} |"
        )
    for r in rows:
        for note in r.notes:
            lines.append(f"- {r.scenario}: {note}")
        for failure in r.failures:
            lines.append(f"- {r.scenario}: FAILED: {failure}")
        for failure in r.too_slow:
            lines.append(f"- {r.scenario}: TOO SLOW: {failure}")
    return "\n".join(lines)


def probe_result(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    """The JSON line a `tests.chaos.probe` process printed (errors counted if it printed none)."""
    out, err = proc.communicate(timeout=timeout)
    lines = out.strip().splitlines()
    if not lines:
        return {
            "round_trips": 0,
            "bytes_verified": 0,
            "errors": 1,
            "p99_ms": 0.0,
            "max_ms": 0.0,
            "p50_ms": 0.0,
            "error_samples": [f"probe printed nothing: {err[-500:]}"],
        }
    return json.loads(lines[-1])
