"""workers: 2 under a real systemd 252: READY from the supervisor once every worker
serves, no worker notifies, a SIGSTOPped worker is replaced (the service stays), a
SIGSTOPped supervisor is restarted by the watchdog, reload and stop reach every worker."""

from __future__ import annotations

from typing import Any

import pytest
from nspawn import Container, wait_until
from test_service import (
    HOST,
    PORT,
    WAIT_S,
    drop_in,
    echo_once,
    events,
    journal_text,
    main_pid,
    serves,
)
from test_service import c as c  # the reset container (fixture)
from test_service import cursor as cursor  # a journal cursor (fixture)

pytestmark = pytest.mark.system

CONFIG = f'listen:\n  - "{HOST}:{PORT}"\nshutdown_timeout: 5s\nworkers: 2\n'


def children(c: Container, pid: int) -> list[int]:
    return [int(p) for p in c.read_file(f"/proc/{pid}/task/{pid}/children").split()]


def worker_events(c: Container, cursor: str, event: str) -> list[dict[str, Any]]:
    return [e for e in events(c, cursor) if e["event"] == event]


def start_with_workers(c: Container, watchdog_s: int | None = None) -> int:
    c.write_file("/etc/epolld.yaml", CONFIG)
    if watchdog_s is not None:
        drop_in(c, "epolld.service", f"[Service]\nWatchdogSec={watchdog_s}s\n")
    c.systemctl("start", "epolld")
    return main_pid(c)


def test_ready_comes_from_the_supervisor_once_both_workers_serve(c: Container, cursor: str) -> None:
    """Active means both workers serve; MainPID is the supervisor, whose two children are
    the workers; no worker sent a notification systemd had to refuse."""
    pid = start_with_workers(c)
    assert c.show("epolld.service", "ActiveState") == "active"
    ready = worker_events(c, cursor, "worker_ready")
    assert sorted(int(e["worker"]) for e in ready) == [1, 2]
    assert sorted(children(c, pid)) == sorted(int(e["pid"]) for e in ready)
    assert worker_events(c, cursor, "workers_ready")
    assert echo_once(PORT, b"two workers\n") == b"two workers\n"
    assert "2 workers" in c.show("epolld.service", "StatusText")
    assert "reception only permitted for main PID" not in journal_text(c, cursor)


def test_stopped_worker_is_replaced_and_the_service_stays(c: Container, cursor: str) -> None:
    """A SIGSTOPped worker stops checking in: the supervisor kills and replaces it before
    systemd's watchdog fires; MainPID and NRestarts stay, the watchdog keeps being fed."""
    pid = start_with_workers(c, watchdog_s=2)
    restarts = c.show("epolld.service", "NRestarts")
    stuck = int(worker_events(c, cursor, "worker_started")[0]["pid"])
    c.run("kill", "-STOP", str(stuck))
    wait_until(
        lambda: any(
            e.get("reason") == "unresponsive" and int(e["pid"]) == stuck
            for e in worker_events(c, cursor, "worker_exited")
        ),
        WAIT_S,
        "the stopped worker to be replaced",
    )
    wait_until(lambda: len(worker_events(c, cursor, "worker_ready")) >= 3, WAIT_S, "a new worker")
    ping = c.show("epolld.service", "WatchdogTimestampMonotonic")
    wait_until(
        lambda: c.show("epolld.service", "WatchdogTimestampMonotonic") != ping,
        WAIT_S,
        "WATCHDOG=1 again once every worker checks in",
    )
    assert main_pid(c) == pid
    assert c.show("epolld.service", "NRestarts") == restarts
    assert stuck not in children(c, pid)
    assert "Watchdog timeout" not in journal_text(c, cursor)
    wait_until(lambda: serves(PORT), WAIT_S, "both workers to serve")


def test_stopped_supervisor_is_restarted_by_the_watchdog(c: Container, cursor: str) -> None:
    """A SIGSTOPped supervisor sends no WATCHDOG=1 however healthy its workers are: systemd
    restarts the service, workers and all."""
    pid = start_with_workers(c, watchdog_s=2)
    old_workers = children(c, pid)
    c.run("kill", "-STOP", str(pid))
    wait_until(
        lambda: main_pid(c) not in (0, pid) and c.show("epolld.service", "ActiveState") == "active",
        WAIT_S,
        "the watchdog to restart epolld",
    )
    assert "Watchdog timeout" in journal_text(c, cursor)
    new_pid = main_pid(c)
    assert not set(children(c, new_pid)) & set(old_workers)
    wait_until(lambda: serves(PORT), WAIT_S, "the restarted service to serve")


def test_reload_and_stop_reach_both_workers(c: Container, cursor: str) -> None:
    """systemctl reload: both workers apply it and the unit is active again; systemctl
    stop: both drain and the supervisor exits 0."""
    start_with_workers(c)
    c.write_file("/etc/epolld.yaml", CONFIG + "stats_interval: 30s\n")
    c.systemctl("reload", "epolld")
    wait_until(lambda: worker_events(c, cursor, "workers_reloaded"), WAIT_S, "the reload")
    reloaded = {int(e["worker"]) for e in worker_events(c, cursor, "config_reloaded")}
    assert reloaded == {1, 2}
    assert c.show("epolld.service", "ActiveState") == "active"
    c.systemctl("stop", "epolld")
    assert c.show("epolld.service", "ExecMainStatus") == "0"
    assert c.show("epolld.service", "Result") == "success"
    started = {
        int(e["worker"]) for e in worker_events(c, cursor, "shutdown_started") if "worker" in e
    }
    assert started == {1, 2}
