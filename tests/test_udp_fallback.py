"""Without recvmmsg/sendmmsg the daemon serves UDP one datagram per system call, and says so once.

The calls are taken away for real: tests/seccomp_exec.py installs a seccomp filter that
refuses them with EPERM or ENOSYS (as a unit's SystemCallFilter=~recvmmsg would), then
execs the daemon.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import StartDaemon
from tests.test_udp_daemon import client, drain, stats, udp_addresses

SECCOMP_EXEC = str(Path(__file__).resolve().parent / "seccomp_exec.py")
OPEN = {"rate": 0, "byte_rate": 0, "total_rate": 0}


@pytest.fixture(params=["level", "edge"])
def mode(request: pytest.FixtureRequest) -> dict[str, Any]:
    return {"trigger": request.param}


def exercise(daemon_ports: list[tuple[str, int]]) -> None:
    """Echo on each listener, a wildcard reply from 127.0.0.2, and a refused source port."""
    (_, bound), (_, wildcard), (_, six) = daemon_ports
    with client() as c:
        for i in range(20):
            c.sendto(b"%d" % i, ("127.0.0.1", bound))
        assert sorted(int(c.recv(100)) for _ in range(20)) == list(range(20))
    with client() as connected:
        connected.connect(("127.0.0.2", wildcard))  # drops a reply from any other source
        connected.send(b"from .2")
        assert connected.recv(100) == b"from .2"
    with client(socket.AF_INET6) as c:
        c.sendto(b"six", ("::1", six))
        assert c.recv(100) == b"six"
    if os.geteuid() == 0:
        with client(bind=("127.0.0.1", 19)) as chargen, client() as good:
            chargen.sendto(b"loop?", ("127.0.0.1", bound))
            good.sendto(b"fine", ("127.0.0.1", bound))
            assert good.recv(100) == b"fine"
            assert drain(chargen) == []


LISTEN = ["udp:127.0.0.1:0", "udp:0.0.0.0:0", "udp:[::1]:0"]


@pytest.mark.parametrize(("deny", "code"), [("recvmmsg,sendmmsg", "EPERM"), ("sendmmsg", "ENOSYS")])
def test_refused_batch_calls_fall_back_and_log_once(
    start_daemon: StartDaemon, deny: str, code: str
) -> None:
    """Under a seccomp filter refusing the batch calls, every UDP listener still echoes
    with every rule, and udp_batch_unavailable is logged once for all three."""
    prefix = (sys.executable, SECCOMP_EXEC, "--deny", deny, "--errno", code, "--")
    daemon = start_daemon({"listen": LISTEN, "udp": OPEN}, prefix=prefix)
    daemon.wait_for("listening", count=3)
    exercise(udp_addresses(daemon))
    (event,) = daemon.events("udp_batch_unavailable")
    assert code in event["error"]
    counters = stats(daemon)
    assert counters["udp_received"] == counters["udp_echoed"] + counters["udp_dropped"]


def test_batch_calls_are_used_when_allowed(start_daemon: StartDaemon) -> None:
    """Without the filter the same exchanges go through recvmmsg/sendmmsg: no fallback is
    logged (so the test above sees the filter's effect, not the default)."""
    daemon = start_daemon({"listen": LISTEN, "udp": OPEN})
    daemon.wait_for("listening", count=3)
    exercise(udp_addresses(daemon))
    stats(daemon)
    assert daemon.events("udp_batch_unavailable") == []
