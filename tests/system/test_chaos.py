"""The fault campaign's short version (`make chaos` runs it long: tests/chaos/).

Scenarios 1 to 3 for a minute or so each, in a real systemd 252 with the package installed:
restarts and an upgrade under the soak's client mix, kills at two steps of a handoff and of the
new process between the batches it restores, and journald stopped under a crowd with
connection logging on. They assert that no byte and no connection is lost and none hangs; the
campaign's bounds on time are left to `make chaos` on a quiet machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos.journal import sick_journal
from tests.chaos.kills import kills_mid_handoff
from tests.chaos.outcome import table
from tests.chaos.restarts import restarts_under_load
from tests.chaos.restore_kills import kills_while_restoring

pytestmark = pytest.mark.system


def test_restarts_and_an_upgrade_under_load_lose_nothing(debs: dict[str, Path]) -> None:
    """With workers: 2, the longer path (tests/system/test_handoff.py restarts one process)."""
    row = restarts_under_load(
        24, 2, workers=2, restart_every=8, upgrade_every=16, package=debs["current"]
    )
    assert not row.failures, table([row])
    assert row.bytes_verified > 0, table([row])
    assert " 0 restarts" not in row.load, table([row])


def test_sick_journal_loses_nothing(debs: dict[str, Path]) -> None:
    row = sick_journal(16, 3, package=debs["current"])
    assert not row.failures, table([row])
    assert row.bytes_verified > 0, table([row])


def test_kills_in_the_middle_of_a_handoff_leave_no_connection_hanging(
    debs: dict[str, Path],
) -> None:
    row = kills_mid_handoff(0, 4, package=debs["current"], points=(1, 3))
    assert not row.failures, table([row])


def test_kills_of_the_restoring_process_recover_what_was_still_in_flight(
    debs: dict[str, Path],
) -> None:
    """The new process killed between the batches it reads: the next one takes over the rest.
    The new supervisor (workers: 2) killed before its batch: the next one takes over every
    client; killed after it: every client is closed, none hangs."""
    row = kills_while_restoring(
        0,
        5,
        package=debs["current"],
        points=(("recvmsg", 2),),
        supervisor_points=(("recvmsg", 1), ("recvmsg", 2)),
    )
    assert not row.failures, table([row])
