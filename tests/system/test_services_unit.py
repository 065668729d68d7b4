"""The packaged unit serving chargen, info and a delaying fault listener on a real systemd
252 (issue 22): each answers under the dynamic user, and `systemctl restart` hands them to
the next process through the file descriptor store: chargen's stream goes on where it was,
and an echo still waiting for its delay arrives whole, from the next process.

The test's sockets live in the container's network namespace.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from nspawn import Container, wait_until
from test_deb import GUEST_DEB_DIR, _install

from epolld.services import pattern
from tests.traffic import recv_exactly, recv_until_eof

pytestmark = pytest.mark.system

ECHO, DELAYED, CHARGEN, INFO = 7080, 7091, 7019, 7092
DELAY_S = 0.3
WAIT_S = 30.0
IO_TIMEOUT_S = 10.0
CONFIG = f"""\
listen:
  - "127.0.0.1:{ECHO}"
  - {{address: "127.0.0.1:{DELAYED}", faults: {{delay: {int(DELAY_S * 1000)}ms}}}}
  - {{address: "127.0.0.1:{CHARGEN}", service: chargen}}
  - {{address: "127.0.0.1:{INFO}", service: info}}
shutdown_timeout: 5s
"""


@pytest.fixture(scope="module")
def installed(
    container_factory: Callable[..., Container], debs: dict[str, Path]
) -> Iterator[Container]:
    """A container with the package installed by apt, serving CONFIG."""
    c = container_factory()
    c.copy_in(debs["current"], f"{GUEST_DEB_DIR}/{debs['current'].name}", 0o644)
    _install(c, debs["current"])
    c.write_file("/etc/epolld.yaml", CONFIG)
    c.systemctl("restart", "epolld")
    c.wait_for_state("epolld", ["active"], WAIT_S)
    with c.network():
        yield c


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT_S)


def _info(c: Container) -> dict[str, object]:
    with _connect(INFO) as sock:
        return json.loads(recv_until_eof(sock, IO_TIMEOUT_S))  # type: ignore[no-any-return]


def test_restart_carries_chargen_and_a_delayed_echo(installed: Container) -> None:
    """info names the unit's main process; chargen's pattern runs on unbroken across a
    restart; bytes sent to the delay listener just before it come back whole and no sooner
    than the delay, and the carried connection keeps its delay; the store is empty after."""
    c = installed
    old_pid = int(c.show("epolld", "MainPID"))
    assert _info(c)["pid"] == old_pid

    chargen = _connect(CHARGEN)
    chargen.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # chargen stays blocked
    delayed = _connect(DELAYED)
    try:
        got = recv_exactly(chargen, 10_000, IO_TIMEOUT_S)
        assert got == pattern.expected(0, 10_000)
        message = b"waits for its delay\n"
        sent_at = time.monotonic()
        delayed.sendall(message)
        c.systemctl("restart", "epolld")
        wait_until(
            lambda: int(c.show("epolld", "MainPID") or 0) not in (0, old_pid) or None,
            WAIT_S,
            "the next process",
        )
        c.wait_for_state("epolld", ["active"], WAIT_S)

        assert recv_exactly(delayed, len(message), IO_TIMEOUT_S) == message
        assert time.monotonic() - sent_at >= DELAY_S
        # The stream goes on where the old process left it, across the handoff.
        more = recv_exactly(chargen, 200_000, IO_TIMEOUT_S)
        assert more == pattern.expected(10_000, 200_000)

        new_pid = int(c.show("epolld", "MainPID"))
        assert _info(c)["pid"] == new_pid != old_pid
        assert int(c.show("epolld", "NFileDescriptorStore") or 0) == 0
        delayed.sendall(b"again\n")  # the carried connection keeps its fault
        started = time.monotonic()
        assert recv_exactly(delayed, 6, IO_TIMEOUT_S) == b"again\n"
        assert time.monotonic() - started >= DELAY_S
    finally:
        chargen.close()
        delayed.close()
