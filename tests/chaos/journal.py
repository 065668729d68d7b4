"""Scenario 3: a sick journal, and a full log file system.

`sick_journal`: in a real systemd 252 with the package installed and connection logging on,
a crowd of CROWD connections echoes and churns (two log lines per replaced connection) while
journald's units are stopped for the middle half of the run and started again. The echo
must go on exactly, the probes' p99 must stay under P99_MAX_MS (the loop never waits on
logging), the service must keep its MainPID, the lines that could not be written must be
counted (the stats line and `epolld_log_lines_dropped_total`), and entries must reach the
journal again once it is back.

`full_log_file`: the daemon in daemon mode with `daemon.log_file` on a small tmpfs that is
filled up under it, then freed: the same promises, and the error reported once.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from tests.chaos.crowd import Crowd
from tests.chaos.netns import REPO
from tests.chaos.outcome import Row, probe_result
from tests.chaos.packaged import PackagedService, missing_privileges, wait_until

PORT = 7080
METRICS_PORT = 9100
CROWD = 1000
P99_MAX_MS = 10.0
WAIT_S = 30.0
CONFIG = f"""\
listen: ["127.0.0.1:{PORT}"]
metrics: {{listen: "127.0.0.1:{METRICS_PORT}"}}
limits: {{max_connections: {CROWD + 100}}}
logging: {{connections: true}}
"""


def _dropped_metric() -> float:
    """epolld_log_lines_dropped_total from the metrics endpoint (in the caller's namespace)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("epolld_log_lines_dropped_total"):
                return float(line.split()[-1])
    return 0.0


def sick_journal(seconds: float, seed: int, package: Path | None = None) -> Row:
    row = Row("3. sick journal")
    reason = missing_privileges()
    if reason:
        row.failures.append(f"cannot run: {reason}")
        return row
    with (
        tempfile.TemporaryDirectory() as tmp,
        PackagedService(Path(tmp), f"epolld-chaos-journal-{seed}", package=package) as service,
    ):
        service.configure(CONFIG)
        pid = service.main_pid()
        crowd = Crowd("127.0.0.1", PORT, CROWD)

        def run_crowd() -> None:
            with service.c.network():
                crowd.run(seconds)

        runner = threading.Thread(target=run_crowd)
        runner.start()
        probe = service.probe(PORT, seconds)
        time.sleep(seconds / 4)
        service.stop_journald()
        stopped_at = time.monotonic()
        time.sleep(seconds / 2)
        service.start_journald()
        away_s = time.monotonic() - stopped_at
        runner.join(seconds + 60)
        result = probe_result(probe, 60)
        problems: list[str] = []
        with service.c.network(), contextlib.suppress(OSError):
            metric = _dropped_metric()
        service.c.systemctl("kill", "--kill-who=main", "--signal=USR1", "epolld")

        def reported() -> dict[str, str] | None:
            found = service.c.journal("-u", "epolld", "EPOLLD_EVENT=log_lines_dropped")
            return found[-1] if found else None

        try:
            report = wait_until(reported, WAIT_S, "log_lines_dropped in the journal")
            dropped = int(report.get("EPOLLD_DROPPED", 0))
        except TimeoutError:
            problems.append("no log_lines_dropped entry reached the journal after it came back")
            dropped = 0
        same_pid = service.main_pid() == pid
        row.errors = service.error_entries()
    row.load = (
        f"{CROWD:,} connections echoing ({crowd.replaced:,} replaced, two log lines each) and"
        f" 5 probes, {seconds:g} s"
    )
    row.faults = f"journald's units stopped for {away_s:.0f} s, then started"
    row.bytes_verified = crowd.verified + result["bytes_verified"]
    row.connections_lost = crowd.error_count + result["errors"]
    row.worst_latency_ms = result["max_ms"]
    row.failures.extend(problems + crowd.errors + result["error_samples"])
    row.notes.append(
        f"{dropped:,} lines dropped and reported once journald was back"
        f" (epolld_log_lines_dropped_total {metric:g}); probes p99 {result['p99_ms']:.2f} ms"
    )
    row.require(same_pid, "the service's MainPID changed")
    row.require(dropped > 0 and metric > 0, "the lines that could not be written were not counted")
    row.require_timing(
        result["p99_ms"] < P99_MAX_MS, f"the probes' p99 was {result['p99_ms']:.2f} ms"
    )
    return row


LOG_FS_BYTES = 64 << 20  # far more than the run logs: the filler, not the log, fills it


def full_log_file(seconds: float, seed: int) -> Row:
    row = Row("3. full log file system")
    if os.geteuid() != 0:
        row.failures.append("cannot run: mounting a small tmpfs needs root")
        return row
    with tempfile.TemporaryDirectory() as tmp:
        mount = Path(tmp) / "logs"
        mount.mkdir()
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={LOG_FS_BYTES}", "tmpfs", str(mount)], check=True
        )
        try:
            _full_log_file(Path(tmp), mount, seconds, row)
        finally:
            subprocess.run(["umount", "-l", str(mount)], check=False)
    return row


def _full_log_file(tmp: Path, mount: Path, seconds: float, row: Row) -> None:
    log_file, pidfile = mount / "epolld.log", tmp / "epolld.pid"
    port = 17000 + os.getpid() % 1000
    config = tmp / "epolld.yaml"
    config.write_text(
        f'listen: ["127.0.0.1:{port}"]\nlogging: {{connections: true, format: json}}\n'
        f"limits: {{max_connections: {CROWD + 100}}}\n"
        f"daemon: {{log_file: {log_file}, pidfile: {pidfile}}}\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "LISTEN_FDS")}
    subprocess.run(
        [sys.executable, "-m", "epolld", "--config", str(config), "--daemon"],
        env=env,
        check=True,
        timeout=WAIT_S,
        cwd=REPO,
    )
    pid = int(
        wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), WAIT_S, "the pidfile")
    )
    try:
        crowd = Crowd("127.0.0.1", port, CROWD)
        runner = threading.Thread(target=crowd.run, args=(seconds,))
        runner.start()
        probe = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.chaos.probe",
                "127.0.0.1",
                str(port),
                f"--seconds={seconds}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        time.sleep(seconds / 4)
        filler = mount / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
        with contextlib.suppress(OSError):  # until ENOSPC
            while True:
                os.write(fd, b"f" * 4096)
        os.close(fd)
        time.sleep(seconds / 2)
        filler.unlink()
        runner.join(seconds + 60)
        result = probe_result(probe, 60)
        os.kill(pid, signal.SIGUSR1)

        def reported() -> list[dict[str, object]] | None:
            found = [e for e in _log_lines(log_file, row) if e.get("event") == "log_lines_dropped"]
            return found or None

        try:
            reports = wait_until(reported, WAIT_S, "log_lines_dropped in the log file")
            dropped = sum(int(e.get("dropped", 0)) for e in reports)  # type: ignore[call-overload]
        except TimeoutError:
            reports, dropped = [], 0
        alive = _alive(pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not _alive(pid), WAIT_S, "the daemon to exit")
    row.load = (
        f"{CROWD:,} connections echoing ({crowd.replaced:,} replaced) and 5 probes, {seconds:g} s"
    )
    row.faults = (
        f"daemon.log_file's {LOG_FS_BYTES >> 20} MiB tmpfs full for {seconds / 2:g} s, then freed"
    )
    row.bytes_verified = crowd.verified + result["bytes_verified"]
    row.connections_lost = crowd.error_count + result["errors"]
    row.worst_latency_ms = result["max_ms"]
    row.failures.extend(crowd.errors + result["error_samples"])
    row.notes.append(
        f"{dropped:,} lines dropped, reported in {len(reports)} line(s);"
        f" probes p99 {result['p99_ms']:.2f} ms"
    )
    row.require(alive, "the daemon died")
    row.require(len(reports) == 1 and dropped > 0, f"the drops were reported {len(reports)} times")
    row.require_timing(
        result["p99_ms"] < P99_MAX_MS, f"the probes' p99 was {result['p99_ms']:.2f} ms"
    )


def _log_lines(log_file: Path, row: Row) -> list[dict[str, object]]:
    """The log file's complete lines; one that is not a JSON object is a failure (a torn line)."""
    text = log_file.read_text(errors="replace")
    lines = []
    for number, line in enumerate(text.split("\n")[:-1], 1):  # the last one may be in progress
        try:
            lines.append(json.loads(line))
        except ValueError:
            failure = f"line {number} of the log file is not JSON: {line[:200]!r}"
            if failure not in row.failures:
                row.failures.append(failure)
    return lines


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
