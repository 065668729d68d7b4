"""The operator's drain under the shipped unit, in a real systemd 252 (issue 23).

The unit runs epolld as a dynamic user with RuntimeDirectory=epolld: control.socket
"auto" puts the socket in /run/epolld, owned by that user, mode 0600, and root runs
`epolld --drain` from a shell. The drain lasts through `systemctl reload` and `systemctl
restart` (the fd store handoff) until `epolld --undrain`; `systemctl stop` removes the
socket.
"""

from __future__ import annotations

import http.client
import socket
from collections.abc import Iterator

import pytest
from nspawn import Container, wait_until

pytestmark = pytest.mark.system

HOST = "127.0.0.1"  # in the container's network namespace, which the c fixture enters
PORT = 7080
METRICS_PORT = 9707
AGENT_PORT = 7082
IO_TIMEOUT_S = 10.0
CONTROL = "/run/epolld/control.sock"


@pytest.fixture
def c(epolld_container: Container) -> Iterator[Container]:
    """The module's container with the service stopped before and after each test; the
    test's sockets are created in the container's network namespace."""
    epolld_container.systemctl("stop", "epolld.socket", "epolld.service")
    epolld_container.systemctl("reset-failed", check=False)
    with epolld_container.network():
        yield epolld_container
    epolld_container.systemctl("stop", "epolld.service", check=False)


def ready_status() -> int:
    conn = http.client.HTTPConnection(HOST, METRICS_PORT, timeout=IO_TIMEOUT_S)
    try:
        conn.request("GET", "/readyz")
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def agent_line() -> str | None:
    """The agent's line, or None while nothing listens (a restart)."""
    try:
        with socket.create_connection((HOST, AGENT_PORT), timeout=IO_TIMEOUT_S) as sock:
            data = b""
            while chunk := sock.recv(256):
                data += chunk
            return data.decode()
    except ConnectionRefusedError:
        return None


@pytest.mark.parametrize("workers", [1, 2])
def test_drain_command_for_the_dynamic_user_lasts_through_reload_and_restart(
    c: Container, workers: int
) -> None:
    """Root drains the unit's daemon with epolld --drain; the agent says drain and /readyz
    503 across a reload and a restart, until epolld --undrain."""
    c.write_file(
        "/etc/epolld.yaml",
        f'listen:\n  - "{HOST}:{PORT}"\nworkers: {workers}\n'
        f'metrics:\n  listen: "{HOST}:{METRICS_PORT}"\n'
        f'agent:\n  listen: "{HOST}:{AGENT_PORT}"\n',
    )
    c.systemctl("start", "epolld")
    owner = c.run("stat", "-c", "%U %a %F", CONTROL).stdout.split()
    assert owner[0] != "root"  # the dynamic user's
    assert owner[1:] == ["600", "socket"]
    assert agent_line() == "up ready 100%\n"
    assert ready_status() == 200
    drained = c.run("epolld", "--drain")
    assert "operator drain: on" in drained.stdout
    assert agent_line() == "drain\n"
    assert ready_status() == 503
    status = c.show("epolld.service", "StatusText")
    assert status.startswith("drained by the operator (epolld --undrain ends it); "), status

    c.systemctl("reload", "epolld")
    wait_until(lambda: c.show("epolld.service", "ActiveState") == "active", 30, "the reload")
    assert "operator drain: on" in c.run("epolld", "--drain-status").stdout
    first_pid = c.show("epolld.service", "MainPID")
    c.systemctl("restart", "epolld")
    wait_until(lambda: c.show("epolld.service", "MainPID") != first_pid, 30, "a new MainPID")
    wait_until(lambda: agent_line() == "drain\n", 30, "the next process's agent")
    assert ready_status() == 503
    assert "operator drain: on" in c.run("epolld", "--drain-status").stdout

    undrained = c.run("epolld", "--undrain")
    assert "operator drain: off" in undrained.stdout
    assert agent_line() == "up ready 100%\n"
    assert ready_status() == 200
    c.systemctl("stop", "epolld")
    assert c.run("test", "-e", CONTROL, check=False).returncode != 0
