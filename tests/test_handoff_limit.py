"""The restart handoff past the user's limit of descriptors in flight (ETOOMANYREFS).

Descriptors in flight in SCM_RIGHTS messages count against the sending user's
RLIMIT_NOFILE unless the process has CAP_SYS_RESOURCE or CAP_SYS_ADMIN. These tests run
the daemon (or a helper) without those two capabilities (setpriv, when root) and with a
small RLIMIT_NOFILE, so that a few hundred connections reach the limit: what fits is
handed over, every other connection gets its FIN, none is reset or left without an answer.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.epolld_process import WAIT_S, Daemon, write_config
from tests.traffic import recv_exactly

pytestmark = pytest.mark.slow

NOFILE = 256  # the daemon's RLIMIT_NOFILE: about 88 descriptors in flight per worker
CONNECTIONS = 300


def _without_caps() -> tuple[str, ...]:
    """A command prefix that drops the capabilities that lift the limit (root only:
    without root, the limit applies already)."""
    if os.geteuid() != 0:
        return ()
    drop = "-sys_resource,-sys_admin"
    return ("setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}", "--")


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    """epolld with 2 workers, without the capabilities, at RLIMIT_NOFILE 256."""
    config = write_config(
        tmp_path / "epolld.yaml",
        {"listen": ["127.0.0.1:0"], "workers": 2, "stats_interval": "0s"},
    )
    started = Daemon(config, nofile=NOFILE, prefix=_without_caps())
    yield started
    pids = {e["pid"] for e in started.events("worker_started")}
    started.stop()
    for pid in pids:  # in their own process group: not reached by Daemon.stop()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_connections_past_the_limit_get_a_fin_and_the_rest_go_on(daemon: Daemon) -> None:
    """SIGUSR2 with 300 connections over 2 workers, where about 176 fit in flight: the
    handoff completes with what fits, every other connection is closed with a FIN (no
    reset, none left waiting), and each worker says once how many and why."""
    daemon.wait_for("workers_ready", timeout=30)
    port = daemon.port
    socks = [
        socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) for _ in range(CONNECTIONS)
    ]
    try:
        for sock in socks:
            sock.sendall(b"a")
        for sock in socks:
            assert recv_exactly(sock, 1, WAIT_S) == b"a"
        daemon.signal(signal.SIGUSR2)
        complete = daemon.wait_for("handoff_complete", timeout=30, worker=None)[0]
        echoed = closed = 0
        for sock in socks:
            sock.sendall(b"b")
            answer = sock.recv(1)  # a reset or a hang fails the test here
            if answer == b"b":
                echoed += 1
            else:
                assert answer == b""
                closed += 1
    finally:
        for sock in socks:
            sock.close()
    over = daemon.events("handoff_over_limit")
    assert {e["worker"] for e in over} == {1, 2}  # once per worker
    assert all("in flight" in e["reason"] for e in over)
    assert sum(e["connections"] for e in over) == closed > 0
    assert complete["connections"] == echoed == CONNECTIONS - closed
    assert not daemon.events("handoff_failed")


# A helper run without the capabilities: one descriptor that must go, then 600 references
# to /dev/null that may stay behind (references count in flight one by one, so a single
# process can pass its own RLIMIT_NOFILE), and a destination that itself sends three
# descriptors, as a worker's transport goes up to its supervisor.
HELPER = """
import json, os, resource, socket
from epolld import handoff

resource.setrlimit(resource.RLIMIT_NOFILE, (400, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
null = os.open("/dev/null", os.O_RDONLY)
out = handoff.StateWriter(systemd_keeps_inherited=False)
out.add({"kind": "listener", "fd": out.fd(null)})
out.optional_from = out.mark()
for i in range(600):
    out.add({"kind": "connection", "fd": out.fd(null), "n": i})
up, down = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

class Upward:
    keeps_inherited = False
    tries = 0
    def deliver(self, transport, out, steps):
        self.tries += 1
        try:
            up.sendmsg([b"t"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                  bytes(memoryview(__import__("array").array("i", [null] * 3))))])
        except OSError as e:
            raise handoff.InFlightLimit(str(e)) from None

upward = Upward()
transport = handoff.send(out, {}, upward, {})
document, _ = handoff.read_state(transport.memfd)
received = handoff.receive_descriptors(b.fileno() for _, b in transport.pairs)
print(json.dumps({
    "tries": upward.tries,
    "left_behind": sorted(r["n"] for r in transport.left_behind),
    "records": [r.get("n", -1) for r in document["records"]],
    "received": sorted(received),
}))
"""


def test_the_kernel_s_refusal_leaves_the_rest_behind_and_takes_batches_back(
    tmp_path: Path,
) -> None:
    """Past the limit the send stops (the rest stays behind), and when the transport
    itself is refused, the oldest optional batch is taken back until it goes; the state
    then lists exactly the records whose descriptors are in flight, the required one
    first."""
    result = subprocess.run(
        [*_without_caps(), sys.executable, "-c", HELPER],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    found = json.loads(result.stdout)
    assert found["tries"] == 2  # refused once, delivered after one batch was taken back
    in_state = found["records"]
    assert in_state[0] == -1  # the required record
    kept = in_state[1:]
    assert kept
    assert kept == sorted(kept)
    assert sorted(kept + found["left_behind"]) == list(range(600))
    # Every descriptor still in flight belongs to a record the state lists.
    assert found["received"] == [0, *(n + 1 for n in kept)]
