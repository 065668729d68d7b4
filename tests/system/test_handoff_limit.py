"""`systemctl restart` past the dynamic user's limit of descriptors in flight, under a real
systemd 252: the packaged unit with LimitNOFILE=256 in a drop-in, so that a few hundred
connections over two workers reach the limit that 20,000 sets at 100,000 connections.

Descriptors in flight count against the sending user's RLIMIT_NOFILE (the unit's
DynamicUser has no CAP_SYS_RESOURCE): what fits is handed over, every other connection
gets a FIN from the old process, none a reset, none is left waiting, and each worker
says so once (handoff_over_limit)."""

from __future__ import annotations

import socket

import pytest
from nspawn import Container, wait_until
from test_service import HOST, PORT, WAIT_S, drop_in, events, journal_text, main_pid
from test_service import c as c  # the reset container (fixture)
from test_service import cursor as cursor  # a journal cursor (fixture)

from tests.traffic import recv_exactly

pytestmark = pytest.mark.system

NOFILE = 256  # each worker's share: (256 - 64 - 2 * 8) / 2 = 88 descriptors in flight
CONNECTIONS = 300
CONFIG = f'listen:\n  - "{HOST}:{PORT}"\nshutdown_timeout: 5s\nworkers: 2\n'


def test_restart_past_the_limit_closes_the_rest_with_a_fin(c: Container, cursor: str) -> None:
    """300 connections over 2 workers at LimitNOFILE=256: the restart completes with the
    connections that fit (they echo again under the new workers), the others get a FIN,
    the counts add up, and nothing fails, waits for a drain or is killed."""
    drop_in(c, "epolld.service", f"[Service]\nLimitNOFILE={NOFILE}\n")
    c.write_file("/etc/epolld.yaml", CONFIG)
    c.systemctl("start", "epolld")
    pid = main_pid(c)
    socks = []
    try:
        for i in range(CONNECTIONS):
            sock = socket.create_connection((HOST, PORT), timeout=WAIT_S)
            socks.append(sock)
            line = b"before %d\n" % i
            sock.sendall(line)
            assert recv_exactly(sock, len(line), WAIT_S) == line
        c.systemctl("restart", "epolld")
        complete = wait_until(
            lambda: [e for e in events(c, cursor) if e["event"] == "handoff_complete"
                     and "worker" not in e] or None,
            WAIT_S,
            "the new supervisor's handoff_complete",
        )[0]  # fmt: skip
        echoed = closed = 0
        for sock in socks:
            sock.sendall(b"after\n")
            answer = sock.recv(6)  # a reset or a hang fails the test here
            if answer == b"":
                closed += 1
            else:
                assert recv_exactly(sock, 6 - len(answer), WAIT_S) == b"after\n"[len(answer) :]
                echoed += 1
    finally:
        for sock in socks:
            sock.close()
    found = events(c, cursor)
    over = [e for e in found if e["event"] == "handoff_over_limit"]
    assert sorted(int(e["worker"]) for e in over) == [1, 2]  # once per worker
    assert all(int(e["rlimit_nofile"]) == NOFILE for e in over)
    assert sum(int(e["connections"]) for e in over) == closed > 0
    assert int(complete["connections"]) == echoed == CONNECTIONS - closed
    assert main_pid(c) != pid
    assert c.show("epolld.service", "ActiveState") == "active"
    assert c.show("epolld.service", "NFileDescriptorStore") == "0"
    assert not [e for e in found if e["event"] in ("handoff_failed", "handoff_partial")]
    assert "Killing process" not in journal_text(c, cursor)
