"""The soak: one epolld under mixed traffic, reloads and signals for a while; does it hold?

    python -m tests.soak [--seconds 600] [--trigger level|edge] [--io copy|splice] [--seed N]

One daemon (a real subprocess on 127.0.0.1, port 0) serves the client mix of
tests/soak_traffic.py. Every 5 s the config file it was started with is rewritten and the
daemon gets SIGHUP, cycling through two valid configurations and a broken one (which must
be rejected while the previous one stays in force); every 10 s it gets SIGUSR1. Every 10 s
a line reports bytes verified, connections, errors, and the daemon's RSS, descriptors and
CPU time. It fails (exit 1, with the reasons) on any error, if RSS grows more than 5 MiB
after the first minute, or if the descriptors do not return to their baseline once the
traffic stops.

It lives in tests/ because it is built from the test suite's pieces (tests/epolld_process.py)
and tests/test_soak.py runs a short version of it in `make test`; `make soak` runs it long.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.epolld_process import Daemon
from tests.soak_traffic import DRAIN_S, STALL_S, Traffic

RELOAD_EVERY_S = 5.0
STATS_EVERY_S = 10.0
REPORT_EVERY_S = 10.0
RSS_SETTLE_S = 60.0  # RSS is measured against its size at the end of the first minute
RSS_GROWTH_MAX = 5 << 20
WAIT_S = 10.0  # the most the daemon may take to answer a signal or to close its descriptors
MIB = 1 << 20

# The two valid configurations differ in every option the soak reloads; the broken one
# fails validation (low_water above high_water) and must change nothing.
VALID = {
    "A": {
        "buffers": {"read_size": "256KiB", "high_water": "1MiB", "low_water": "256KiB"},
        "limits": {"max_connections": 10000, "idle_timeout": "120s"},
    },
    "B": {
        "buffers": {"read_size": "16KiB", "high_water": "128KiB", "low_water": "32KiB"},
        "limits": {"max_connections": 5000, "idle_timeout": "90s"},
    },
}
BROKEN = {"buffers": {"read_size": "16KiB", "high_water": "64KiB", "low_water": "1MiB"}}
RELOADED_OPTIONS = {
    "buffers.read_size",
    "buffers.high_water",
    "buffers.low_water",
    "limits.max_connections",
    "limits.idle_timeout",
}
CYCLE = ["B", "broken", "A"]  # the daemon starts on A


def config_text(trigger: str, io: str, variant: str) -> str:
    settings: dict[str, Any] = {
        "listen": ["127.0.0.1:0"],
        "trigger": trigger,
        "io": io,
        "stats_interval": 0,  # only SIGUSR1 logs stats, so that each one can be counted
        "logging": {"level": "info", "connections": False},
        **(BROKEN if variant == "broken" else VALID[variant]),
    }
    return yaml.safe_dump(settings, sort_keys=False)


@dataclass
class Sample:
    t: float
    verified: int
    connections: int
    open_now: int
    errors: int
    rss: int
    fds: int
    cpu_s: float

    def line(self, fd_baseline: int, before: Sample | None = None) -> str:
        """One report line; with the sample before it, the daemon's share of a core since."""
        share = ""
        if before is not None and self.t > before.t:
            share = f" ({(self.cpu_s - before.cpu_s) / (self.t - before.t):.0%} of a core)"
        return (
            f"[{self.t:5.0f} s] verified {self.verified / MIB:9.1f} MiB, "
            f"connections {self.connections} ({self.open_now} open), errors {self.errors}, "
            f"rss {self.rss / MIB:.1f} MiB, fds {self.fds} (baseline {fd_baseline}), "
            f"cpu {self.cpu_s:.1f} s{share}"
        )


@dataclass
class Result:
    seconds: float
    trigger: str
    io: str
    seed: int
    samples: list[Sample] = field(default_factory=list)
    fd_baseline: int = 0
    fd_after: int = 0
    reloads_applied: int = 0
    reloads_rejected: int = 0
    stats_answered: int = 0
    opened: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)  # traffic and daemon errors
    error_count: int = 0
    warnings: Counter[str] = field(default_factory=Counter)  # daemon warning events
    rss_growth: int | None = None  # after the first minute; None for shorter runs
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def summary(self) -> list[str]:
        last = self.samples[-1] if self.samples else None
        lines = [
            f"soak {'passed' if self.passed else 'FAILED'}: {self.seconds:.0f} s, "
            f"trigger {self.trigger}, io {self.io}, seed {self.seed}",
            f"  verified {last.verified / MIB:.1f} MiB over {last.connections} connections"
            if last
            else "  no sample taken",
            "  connections by kind: "
            + ", ".join(f"{k} {n}" for k, n in sorted(self.opened.items())),
            f"  reloads: {self.reloads_applied} applied, {self.reloads_rejected} rejected; "
            f"SIGUSR1 answered {self.stats_answered}",
            f"  descriptors: baseline {self.fd_baseline}, after the traffic {self.fd_after}",
            "  rss growth after the first minute: "
            + (
                f"{self.rss_growth / MIB:.2f} MiB"
                if self.rss_growth is not None
                else "not measured"
            ),
        ]
        if last:
            lines.append(
                f"  daemon cpu {last.cpu_s:.1f} s; rss {last.rss / MIB:.1f} MiB at the end"
            )
        if self.warnings:
            lines.append(
                "  daemon warnings: " + ", ".join(f"{k} {n}" for k, n in self.warnings.items())
            )
        lines += [f"  error: {e}" for e in self.errors[:20]]
        lines += [f"  FAILED: {f}" for f in self.failures]
        return lines


class Soak:
    """One run: start the daemon, drive traffic and signals, check, stop the daemon."""

    def __init__(
        self,
        seconds: float,
        *,
        trigger: str = "level",
        io: str = "copy",
        seed: int | None = None,
        stall_s: float = STALL_S,
        drain_s: float = DRAIN_S,
        report: Callable[[str], None] = print,
    ) -> None:
        self.seconds = seconds
        self.stall_s = stall_s
        self.drain_s = drain_s
        self.trigger = trigger
        self.io = io
        self.seed = seed if seed is not None else int.from_bytes(os.urandom(4), "big")
        self.report = report
        self.result = Result(seconds, trigger, io, self.seed)
        self._variant = "A"
        self._reference_changes: dict[str, list[Any]] | None = None

    def run(self) -> Result:
        with tempfile.TemporaryDirectory(prefix="epolld-soak-") as tmp:
            config = Path(tmp) / "epolld.yaml"
            config.write_text(config_text(self.trigger, self.io, "A"))
            daemon = Daemon(config)
            traffic: Traffic | None = None
            try:
                daemon.wait_for("listening")
                self.result.fd_baseline = daemon.fd_count()
                traffic = Traffic(
                    daemon.port, self.seed, stall_s=self.stall_s, drain_s=self.drain_s
                )
                self._soak(daemon, traffic)
            finally:
                if traffic is not None:
                    traffic.abort()
                daemon.stop()
            if daemon.bad_lines:
                self.fail(f"the daemon logged lines that are not JSON: {daemon.bad_lines[:3]}")
        return self.result

    def fail(self, reason: str) -> None:
        self.result.failures.append(reason)

    def _soak(self, daemon: Daemon, traffic: Traffic) -> None:
        started = time.monotonic()
        stop_at = started + self.seconds
        thread = threading.Thread(target=traffic.run, args=(stop_at,), name="soak-traffic")
        thread.start()
        try:
            self._record(daemon, traffic, started, " (start)")
            self._drive(daemon, traffic, started, stop_at)
        finally:
            if self.result.failures or traffic.error_count:
                traffic.abort()
            thread.join(self.seconds + self.drain_s + WAIT_S)
            if thread.is_alive():
                self.fail("the traffic did not stop")
                traffic.abort()
                thread.join(WAIT_S)
        self.result.opened = traffic.opened
        if daemon.proc.poll() is None:
            self._check_descriptors(daemon)
            self._record(daemon, traffic, started, " (traffic stopped)")
            self._check_stats_idle(daemon)
            self._stop(daemon)
        self._collect_errors(daemon, traffic)
        self._check_rss()

    def _drive(self, daemon: Daemon, traffic: Traffic, started: float, stop_at: float) -> None:
        """Signal and report on schedule until the deadline or the first failure."""
        next_reload = started + RELOAD_EVERY_S
        next_stats = started + STATS_EVERY_S
        next_report = started + REPORT_EVERY_S
        reloads = 0
        while (now := time.monotonic()) < stop_at:
            if (code := daemon.proc.poll()) is not None:
                self.fail(f"the daemon exited with code {code} during the soak:\n{daemon.tail()}")
                return
            if traffic.finished.is_set() or traffic.error_count or self.result.failures:
                return  # the first failure is reported with its detail: no need to go on
            if now >= next_reload:
                self._reload(daemon, CYCLE[reloads % len(CYCLE)])
                reloads += 1
                next_reload += RELOAD_EVERY_S
            if now >= next_stats:
                self._stats(daemon)
                next_stats += STATS_EVERY_S
            if now >= next_report:
                self._record(daemon, traffic, started)
                next_report += REPORT_EVERY_S
            time.sleep(max(0.0, min(0.2, next_reload - now, next_stats - now, next_report - now)))

    def _reload(self, daemon: Daemon, variant: str) -> None:
        """Rewrite the config file, SIGHUP, and check that the daemon did what it should."""
        applied = len(daemon.events("config_reloaded"))
        rejected = len(daemon.events("config_reload_failed"))
        tmp = daemon.config_path.with_suffix(".tmp")
        tmp.write_text(config_text(self.trigger, self.io, variant))
        tmp.replace(daemon.config_path)  # the daemon never reads a half-written file
        daemon.signal(signal.SIGHUP)
        deadline = time.monotonic() + WAIT_S
        while True:
            done = daemon.events("config_reloaded")[applied:]
            failed = daemon.events("config_reload_failed")[rejected:]
            if done or failed:
                break
            if time.monotonic() > deadline or daemon.proc.poll() is not None:
                self.fail(f"no answer to SIGHUP (config {variant}) within {WAIT_S:.0f} s")
                return
            time.sleep(0.02)
        if variant == "broken":
            if done:
                self.fail(f"the broken config was applied: {done[0]}")
            elif "low_water" not in str(failed[0].get("error")):
                self.fail(f"the broken config was rejected for the wrong reason: {failed[0]}")
            else:
                self.result.reloads_rejected += 1
            return
        if failed:
            self.fail(f"valid config {variant} was rejected: {failed[0].get('error')}")
            return
        self._check_changes(variant, done[0].get("changes", {}))
        self.result.reloads_applied += 1
        self._variant = variant

    def _check_changes(self, variant: str, changes: dict[str, list[Any]]) -> None:
        """A -> B always changes the same options; B -> A undoes exactly that. After the
        broken file, the daemon must still be on the configuration before it."""
        if self._reference_changes is None:  # the first reload, A -> B
            if set(changes) != RELOADED_OPTIONS:
                self.fail(
                    f"reload A -> B changed {sorted(changes)}, not {sorted(RELOADED_OPTIONS)}"
                )
            self._reference_changes = changes
            return
        forward = self._reference_changes
        expected = forward if variant == "B" else {k: [b, a] for k, (a, b) in forward.items()}
        if changes != expected:
            self.fail(
                f"reload {self._variant} -> {variant} changed {changes}, expected {expected}: "
                "the daemon was not running on the configuration before the broken one"
            )

    def _stats(self, daemon: Daemon) -> None:
        before = len(daemon.events("stats"))
        daemon.signal(signal.SIGUSR1)
        try:
            daemon.wait_for("stats", count=before + 1, timeout=WAIT_S)
        except AssertionError:
            self.fail(f"no stats line within {WAIT_S:.0f} s of SIGUSR1")
            return
        self.result.stats_answered += 1

    def _record(self, daemon: Daemon, traffic: Traffic, started: float, note: str = "") -> None:
        """Take a sample, keep it, and report it."""
        samples = self.result.samples
        before = samples[-1] if samples else None
        samples.append(self._sample(daemon, traffic, started))
        self.report(samples[-1].line(self.result.fd_baseline, before) + note)

    def _sample(self, daemon: Daemon, traffic: Traffic, started: float) -> Sample:
        return Sample(
            t=time.monotonic() - started,
            verified=traffic.verified,
            connections=traffic.connections,
            open_now=len(traffic.clients),
            errors=traffic.error_count + len(_daemon_errors(daemon)),
            rss=daemon.rss_bytes(),
            fds=daemon.fd_count(),
            cpu_s=daemon.cpu_seconds(),
        )

    def _check_descriptors(self, daemon: Daemon) -> None:
        """Every client is gone: the daemon's descriptors must return to the baseline."""
        baseline = self.result.fd_baseline
        deadline = time.monotonic() + WAIT_S
        while (count := daemon.fd_count()) != baseline and time.monotonic() < deadline:
            time.sleep(0.05)
        self.result.fd_after = count
        if count != baseline:
            self.fail(
                f"{count} descriptors {WAIT_S:.0f} s after the traffic stopped, baseline "
                f"{baseline}: {_descriptors(daemon.pid)}"
            )

    def _check_stats_idle(self, daemon: Daemon) -> None:
        self._stats(daemon)
        stats = daemon.events("stats")
        if stats and stats[-1].get("connections") != 0:
            self.fail(f"the daemon still counts connections after the traffic: {stats[-1]}")

    def _stop(self, daemon: Daemon) -> None:
        daemon.signal(signal.SIGTERM)
        try:
            code = daemon.wait(WAIT_S)
        except subprocess.TimeoutExpired:
            self.fail(f"the daemon did not exit within {WAIT_S:.0f} s of SIGTERM")
            return
        if code != 0:
            self.fail(f"the daemon exited with code {code} on SIGTERM:\n{daemon.tail()}")

    def _collect_errors(self, daemon: Daemon, traffic: Traffic) -> None:
        result = self.result
        daemon_errors = _daemon_errors(daemon)
        result.error_count = traffic.error_count + len(daemon_errors)
        result.errors = traffic.errors + [f"daemon logged {e}" for e in daemon_errors]
        result.warnings = Counter(
            str(e.get("event")) for e in daemon.logs if e.get("level") == "warning"
        )
        if result.error_count:
            self.fail(f"{result.error_count} errors (the first ones are listed above)")

    def _check_rss(self) -> None:
        after = [s for s in self.result.samples if s.t >= RSS_SETTLE_S]
        if len(after) < 2:
            return  # shorter than the first minute and one report: nothing to compare
        growth = max(s.rss for s in after) - after[0].rss
        self.result.rss_growth = growth
        if growth > RSS_GROWTH_MAX:
            self.fail(
                f"RSS grew {growth / MIB:.1f} MiB after the first minute "
                f"({after[0].rss / MIB:.1f} -> {max(s.rss for s in after) / MIB:.1f} MiB), "
                f"more than {RSS_GROWTH_MAX / MIB:.0f} MiB"
            )


def _daemon_errors(daemon: Daemon) -> list[dict[str, Any]]:
    """Error lines other than the rejections of the broken config, which are expected."""
    return [
        e
        for e in daemon.logs
        if e.get("level") in ("error", "critical") and e.get("event") != "config_reload_failed"
    ]


def _descriptors(pid: int) -> str:
    targets = []
    for fd in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
        with contextlib.suppress(OSError):  # closed meanwhile
            targets.append(f"{fd} -> {os.readlink(f'/proc/{pid}/fd/{fd}')}")
    return ", ".join(targets)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--seconds", type=float, default=600.0, help="how long (default 600)")
    parser.add_argument("--trigger", choices=["level", "edge"], default="level")
    parser.add_argument("--io", choices=["copy", "splice"], default="copy")
    parser.add_argument("--seed", type=int, help="the traffic's random seed (to repeat a run)")
    args = parser.parse_args(argv)
    if args.seconds <= 0:
        parser.error("--seconds must be positive")
    soak = Soak(args.seconds, trigger=args.trigger, io=args.io, seed=args.seed, report=_say)
    _say(f"soak: {args.seconds:.0f} s, trigger {args.trigger}, io {args.io}, seed {soak.seed}")
    result = soak.run()
    for line in result.summary():
        _say(line)
    return 0 if result.passed else 1


def _say(line: str) -> None:
    print(line, flush=True)


if __name__ == "__main__":
    sys.exit(main())
