"""Scenario 1: restarts and package upgrades under load, in a real systemd 252.

The Debian package of this checkout is installed in a container; the soak's client mix and
ping-pong probes run against it from the container's network while `systemctl restart
epolld` comes every RESTART_EVERY_S and an upgrade to a rebuilt package of the next version
(dpkg -i, whose postinst restarts the service: the handoff again) every UPGRADE_EVERY_S.
Every byte of every connection the client did not reset itself must come back; no
connection may be lost to a restart; after each one the file descriptor store must be
empty; and the service's memory must grow less than RSS_GROWTH_MAX after its first minute.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

from tests.chaos.outcome import Row, probe_result
from tests.chaos.packaged import PackagedService, missing_privileges
from tests.soak_traffic import Traffic

PORT = 7080
RESTART_EVERY_S = 20.0
UPGRADE_EVERY_S = 60.0
RSS_SETTLE_S = 60.0
RSS_GROWTH_MAX = 5 << 20
CONFIG = """\
listen: ["127.0.0.1:{port}"]
workers: {workers}
buffers: {{high_water: 1MiB, low_water: 256KiB}}
logging: {{connections: false}}
"""


def restarts_under_load(
    seconds: float,
    seed: int,
    workers: int = 1,
    restart_every: float = RESTART_EVERY_S,
    upgrade_every: float = UPGRADE_EVERY_S,
    package: Path | None = None,
) -> Row:
    row = Row(f"1. restarts under load (workers: {workers})")
    reason = missing_privileges()
    if reason:
        row.failures.append(f"cannot run: {reason}")
        return row
    upgrades = int(seconds // upgrade_every)
    with (
        tempfile.TemporaryDirectory() as tmp,
        PackagedService(
            Path(tmp), f"epolld-chaos-restarts-{seed}-{workers}", upgrades, package
        ) as service,
    ):
        service.configure(CONFIG.format(port=PORT, workers=workers))
        _run(service, row, seconds, seed, restart_every, upgrade_every)
    return row


def _run(
    service: PackagedService,
    row: Row,
    seconds: float,
    seed: int,
    restart_every: float,
    upgrade_every: float,
) -> None:
    traffic = Traffic(PORT, seed)
    started = time.monotonic()
    stop_at = started + seconds

    def run_traffic() -> None:
        with service.c.network():
            traffic.run(stop_at)

    runner = threading.Thread(target=run_traffic)
    runner.start()
    probe = service.probe(PORT, seconds)
    restarts = 0
    next_restart = started + restart_every
    next_upgrade = started + upgrade_every
    rss_after_first_minute = rss_last = 0
    # The last action leaves the clients half an interval to finish against the newest process.
    while time.monotonic() < stop_at - restart_every / 2 and runner.is_alive():
        now = time.monotonic()
        if now >= next_upgrade and service.upgrades < len(service.newer):
            what, problem = "upgrade", service.upgrade()
            next_upgrade += upgrade_every
            next_restart = time.monotonic() + restart_every
        elif now >= next_restart:
            what, problem = "restart", service.restart()
            restarts += 1
            next_restart += restart_every
        else:
            time.sleep(0.5)
            continue
        if problem:
            row.failures.append(f"{what} at {now - started:.0f} s: {problem}")
        rss_last = service.rss()
        if not rss_after_first_minute and time.monotonic() - started >= RSS_SETTLE_S:
            rss_after_first_minute = rss_last
    runner.join(seconds + 120)
    result = probe_result(probe, 120)
    row.load = (
        f"{seconds:g} s of the soak's mix ({traffic.connections:,} connections) and 5 probes:"
        f" {restarts} restarts, {service.upgrades} upgrades"
    )
    row.faults = (
        f"systemctl restart every {restart_every:g} s,"
        f" dpkg -i of the next version every {upgrade_every:g} s"
    )
    row.bytes_verified = traffic.verified + result["bytes_verified"]
    row.connections_lost = traffic.error_count + result["errors"]
    row.errors = service.error_entries()
    if row.connections_lost or row.errors:
        row.notes.append(f"epolld's warnings and errors by event: {service.warnings()}")
    row.worst_latency_ms = result["max_ms"]
    row.failures.extend(traffic.errors + result["error_samples"])
    row.require(not runner.is_alive(), "the client mix did not finish")
    row.require(restarts + service.upgrades > 0, "no restart happened")
    growth = rss_last - rss_after_first_minute if rss_after_first_minute else 0
    row.notes.append(
        f"probes through every restart: p50 {result['p50_ms']:.1f} ms,"
        f" p99 {result['p99_ms']:.1f} ms;"
        f" service RSS {rss_after_first_minute / 2**20:.1f} MiB after the first minute,"
        f" {rss_last / 2**20:.1f} MiB at the end"
    )
    row.require(
        growth < RSS_GROWTH_MAX or seconds < 2 * RSS_SETTLE_S,
        f"the service's RSS grew {growth / 2**20:.1f} MiB after its first minute",
    )
