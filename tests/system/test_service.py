"""epolld under a real systemd 252: the shipped units, readiness, reload, watchdog, journal, stop.

One container serves the module; each test starts from a stopped service, the shipped units
without drop-ins, and a config listening on 127.0.0.1. That is the container's own loopback:
the container has a network namespace of its own and each test runs inside it (the c fixture
enters it), so nothing listening on the host's ports can collide with the daemon under test.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import GUEST_REPO, UNIT_DIR
from nspawn import Container, wait_until

pytestmark = pytest.mark.system

HOST = "127.0.0.1"  # in the container's network namespace
PORT = 7080
NEW_PORT = 7081
SOCKET_PORT = 7082
WAIT_S = 30.0  # for anything systemd or the daemon does in response to a command
IO_TIMEOUT_S = 10.0
DROP_IN_DIRS = "/etc/systemd/system/epolld.service.d /etc/systemd/system/epolld.socket.d"


def config_text(port: int) -> str:
    return f'listen:\n  - "{HOST}:{port}"\nshutdown_timeout: 10s\n'


class Client:
    """A TCP connection to the daemon under test."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=IO_TIMEOUT_S)

    def echo(self, payload: bytes) -> bytes:
        self.sock.sendall(payload)
        return self.receive(len(payload))

    def receive(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                break
            data += chunk
        return data

    def close(self) -> None:
        self.sock.close()


def echo_once(port: int, payload: bytes = b"ping\n") -> bytes:
    client = Client(port)
    try:
        return client.echo(payload)
    finally:
        client.close()


def refused(port: int) -> bool:
    try:
        echo_once(port)
    except ConnectionRefusedError:
        return True
    return False


def serves(port: int) -> bool:
    try:
        return echo_once(port) == b"ping\n"
    except ConnectionRefusedError:
        return False


def events(c: Container, cursor: str) -> list[dict[str, Any]]:
    """epolld's log events since cursor, from their native journal fields (EPOLLD_EVENT=x,
    EPOLLD_ADDRESS=y -> {"event": x, "address": y}), each with the journal's PRIORITY."""
    found = []
    for entry in c.journal("-u", "epolld.service", "--after-cursor", cursor):
        if entry.get("SYSLOG_IDENTIFIER") != "epolld" or "EPOLLD_EVENT" not in entry:
            continue
        event = {
            k[len("EPOLLD_") :].lower(): v for k, v in entry.items() if k.startswith("EPOLLD_")
        }
        event["PRIORITY"] = entry["PRIORITY"]
        found.append(event)
    return found


def journal_text(c: Container, cursor: str) -> str:
    args = ("--no-pager", "-u", "epolld.service", "--after-cursor", cursor)
    return c.run("journalctl", *args).stdout


def main_pid(c: Container) -> int:
    return int(c.show("epolld.service", "MainPID"))


def max_open_files(c: Container, pid: str) -> tuple[int, int]:
    """(soft, hard) RLIMIT_NOFILE of a process in the container."""
    for line in c.read_file(f"/proc/{pid}/limits").splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError(f"no open files limit for PID {pid}")


def drop_in(c: Container, unit: str, text: str) -> None:
    c.write_file(f"/etc/systemd/system/{unit}.d/test.conf", text)
    c.systemctl("daemon-reload")


@pytest.fixture
def c(epolld_container: Container) -> Iterator[Container]:
    """The module's container, reset: units stopped, no drop-ins, config on PORT.

    The test's sockets are created in the container's network namespace.
    """
    container = epolld_container
    container.systemctl("stop", "epolld.socket", "epolld.service")
    container.systemctl("reset-failed", check=False)
    container.sh(f"rm -rf {DROP_IN_DIRS}")
    container.systemctl("daemon-reload")
    container.write_file("/etc/epolld.yaml", config_text(PORT))
    with container.network():
        yield container
    container.systemctl("stop", "epolld.socket", "epolld.service", check=False)


@pytest.fixture
def cursor(c: Container) -> str:
    return c.journal_cursor()


def test_shipped_units_verify_clean(c: Container) -> None:
    """systemd 252's own verifier finds nothing to report in the shipped units."""
    result = c.run(
        "systemd-analyze", "verify", "--man=no",  # man pages come with the Debian package
        f"{UNIT_DIR}/epolld.service", f"{UNIT_DIR}/epolld.socket", check=False,
    )  # fmt: skip
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_start_waits_for_ready_then_serves(c: Container) -> None:
    """The unit is activating until epolld sends READY=1, which comes only once it listens."""
    # Hold the main process before it becomes epolld: systemd has started it, no READY yet.
    drop_in(c, "epolld.service", (
        "[Service]\nExecStart=\n"
        "ExecStart=/bin/sh -c 'kill -STOP $$$$ && exec /usr/bin/epolld --config /etc/epolld.yaml'\n"
    ))  # fmt: skip
    c.systemctl("start", "--no-block", "epolld")
    pid = wait_until(lambda: main_pid(c) or None, WAIT_S, "a main PID")
    wait_until(
        lambda: c.read_file(f"/proc/{pid}/stat").split(") ")[1].startswith("T"),
        WAIT_S,
        "the held process to stop",
    )
    assert c.show("epolld.service", "ActiveState") == "activating"
    assert refused(PORT)

    c.run("kill", "-CONT", str(pid))
    assert c.wait_for_state("epolld.service", {"active", "failed"}) == "active"
    assert main_pid(c) == pid, "READY=1 must come from the main process (NotifyAccess=main)"
    # Active means listening: the first connection needs no retry.
    assert echo_once(PORT, b"hello, systemd\n") == b"hello, systemd\n"


def test_bad_config_fails_once_without_restart_loop(c: Container) -> None:
    """An invalid config fails the start with exit 78, is not restarted, and status says why."""
    c.write_file("/etc/epolld.yaml", "listen: 7080\n")
    assert c.systemctl("start", "epolld", check=False).returncode != 0
    assert c.wait_for_state("epolld.service", {"failed", "inactive"}) == "failed"
    assert c.show("epolld.service", "ExecMainStatus") == "78"
    assert c.show("epolld.service", "NRestarts") == "0", "RestartPreventExitStatus=78"
    status = c.systemctl("status", "--no-pager", "epolld", check=False).stdout
    assert "Error: /etc/epolld.yaml:1: listen:" in status
    assert "status=78/CONFIG" in status


def test_runs_sandboxed_without_privileges(c: Container) -> None:
    """The daemon runs as a dynamic user with no capabilities, no new privileges and seccomp."""
    c.systemctl("start", "epolld")
    pid = main_pid(c)
    status = dict(line.split(":", 1) for line in c.read_file(f"/proc/{pid}/status").splitlines())
    assert int(status["Uid"].split()[0]) >= 61184, "DynamicUser= allocates from 61184"
    assert int(status["CapEff"], 16) == 0
    assert int(status["CapBnd"], 16) == 0
    assert status["NoNewPrivs"].strip() == "1"
    assert status["Seccomp"].strip() == "2"  # filter mode: SystemCallFilter= is in force
    assert echo_once(PORT) == b"ping\n"
    assert c.show("epolld.service", "StatusText").startswith(f"echoing on {HOST}:{PORT}")


LOW_PORT = 7  # the echo protocol's own port (RFC 862)
LOW_PORT_OPT_IN = (
    "[Service]\nAmbientCapabilities=CAP_NET_BIND_SERVICE\n"
    "CapabilityBoundingSet=CAP_NET_BIND_SERVICE\nPrivateUsers=no\n"
)


def test_low_port_needs_the_documented_opt_in(c: Container, cursor: str) -> None:
    """Port 7 is refused without capabilities and served with the unit's documented drop-in."""
    c.write_file("/etc/epolld.yaml", config_text(LOW_PORT))
    assert c.systemctl("start", "epolld", check=False).returncode != 0
    c.systemctl("stop", "epolld")  # cancel Restart=on-failure's next attempt
    journal = journal_text(c, cursor)
    assert "ports below 1024 need CAP_NET_BIND_SERVICE" in journal
    assert "status=69/UNAVAILABLE" in journal

    drop_in(c, "epolld.service", LOW_PORT_OPT_IN)
    c.systemctl("start", "epolld")
    assert echo_once(LOW_PORT) == b"ping\n"


def test_splice_io_passes_the_syscall_filter(c: Container) -> None:
    """io: splice (pipes and splice(2)) works under SystemCallFilter= and the fd limit."""
    c.write_file("/etc/epolld.yaml", config_text(PORT) + "io: splice\n")
    c.systemctl("start", "epolld")
    payload = bytes(range(256)) * 1024
    client = Client(PORT)
    try:
        assert client.echo(payload) == payload
    finally:
        client.close()
    assert c.show("epolld.service", "ActiveState") == "active"
    # LimitNOFILE=65536, capped by the hard limit this container's systemd has itself (the
    # host's: nspawn does not let it raise it).
    assert c.show("epolld.service", "LimitNOFILE") == "65536"
    ceiling = max_open_files(c, "1")[1]
    assert max_open_files(c, str(main_pid(c))) == (min(65536, ceiling),) * 2


def test_unix_socket_in_runtime_directory(c: Container) -> None:
    """Under DynamicUser and ProtectSystem=strict, a unix: listener in /run/epolld works."""
    c.write_file("/etc/epolld.yaml", 'listen:\n  - "unix:/run/epolld/echo.sock"\n')
    c.systemctl("start", "epolld")
    client = (
        "import socket; s = socket.socket(socket.AF_UNIX); s.settimeout(10); "
        "s.connect('/run/epolld/echo.sock'); s.sendall(b'over unix'); print(s.recv(100))"
    )
    assert c.run("python3", "-c", client).stdout == "b'over unix'\n"
    c.systemctl("stop", "epolld")
    assert c.run("test", "-e", "/run/epolld", check=False).returncode != 0, "removed on stop"


def test_reload_moves_to_new_port_keeping_pid_and_connections(c: Container, cursor: str) -> None:
    """A reload to a new port keeps the MainPID, serves the new port and keeps old clients."""
    c.systemctl("start", "epolld")
    pid = main_pid(c)
    old_client = Client(PORT)
    try:
        assert old_client.echo(b"before\n") == b"before\n"
        c.write_file("/etc/epolld.yaml", config_text(NEW_PORT))
        c.systemctl("reload", "epolld")
        # systemd 252 returns once ExecReload's kill exits, before epolld re-binds: poll.
        wait_until(lambda: serves(NEW_PORT), WAIT_S, f"epolld to serve port {NEW_PORT}")
        wait_until(lambda: refused(PORT), WAIT_S, f"port {PORT} to be closed")
        assert main_pid(c) == pid
        assert c.show("epolld.service", "ActiveState") == "active"
        assert old_client.echo(b"after the reload\n") == b"after the reload\n"
    finally:
        old_client.close()
    wait_until(
        lambda: f"{HOST}:{NEW_PORT}" in c.show("epolld.service", "StatusText"),
        WAIT_S,
        "STATUS to name the new port",
    )
    assert "config_reloaded" in [e["event"] for e in events(c, cursor)]


def test_broken_reload_keeps_old_config_and_says_why(c: Container, cursor: str) -> None:
    """A broken config makes reload fail; epolld stays active on the old one, status says why."""
    c.systemctl("start", "epolld")
    pid = main_pid(c)
    client = Client(PORT)
    try:
        c.write_file("/etc/epolld.yaml", "listen: [\n")
        result = c.systemctl("reload", "epolld", check=False)
        assert result.returncode != 0, "ExecReload's --check-config must fail the reload"
        status = c.systemctl("status", "--no-pager", "--lines=20", "epolld", check=False).stdout
        assert "Active: active (running)" in status
        assert "Error: /etc/epolld.yaml" in status
        assert "Reload failed" in status

        # epolld's own guard, for a SIGHUP that skips ExecReload's check (kill -HUP by hand).
        c.systemctl("kill", "--kill-who=main", "--signal=HUP", "epolld")
        wait_until(
            lambda: "reload failed" in c.show("epolld.service", "StatusText"),
            WAIT_S,
            "STATUS to report the failed reload",
        )
        assert c.show("epolld.service", "ActiveState") == "active"
        assert main_pid(c) == pid
        assert client.echo(b"still here\n") == b"still here\n"
        assert echo_once(PORT) == b"ping\n"
    finally:
        client.close()
    failed = [e for e in events(c, cursor) if e["event"] == "config_reload_failed"]
    assert failed, "the daemon logs why it kept the old configuration"
    assert failed[0]["PRIORITY"] == "3"  # error


def test_watchdog_restarts_a_stopped_daemon(c: Container, cursor: str) -> None:
    """A daemon that stops pinging (SIGSTOP) is killed by the watchdog and restarted."""
    drop_in(c, "epolld.service", "[Service]\nWatchdogSec=2s\n")
    c.systemctl("start", "epolld")
    pid = main_pid(c)
    restarts = int(c.show("epolld.service", "NRestarts"))
    first_ping = c.show("epolld.service", "WatchdogTimestampMonotonic")
    wait_until(
        lambda: c.show("epolld.service", "WatchdogTimestampMonotonic") != first_ping,
        WAIT_S,
        "a WATCHDOG=1 ping from the event loop",
    )

    c.run("kill", "-STOP", str(pid))
    new_pid = wait_until(
        lambda: (
            (p := main_pid(c)) not in (0, pid)
            and c.show("epolld.service", "ActiveState") == "active"
            and p
        ),
        WAIT_S,
        "the watchdog to restart epolld",
    )
    assert new_pid != pid
    assert int(c.show("epolld.service", "NRestarts")) == restarts + 1
    assert "Watchdog timeout" in journal_text(c, cursor)
    wait_until(lambda: serves(PORT), WAIT_S, "the restarted daemon to serve")


def test_journal_has_structured_events_with_priorities(c: Container, cursor: str) -> None:
    """Each event is one journal entry whose PRIORITY matches its level."""
    c.systemctl("start", "epolld")
    c.write_file("/etc/epolld.yaml", "listen: 7080\n")  # valid YAML, invalid config
    c.systemctl("kill", "--kill-who=main", "--signal=HUP", "epolld")
    wait_until(
        lambda: any(e["event"] == "config_reload_failed" for e in events(c, cursor)),
        WAIT_S,
        "config_reload_failed in the journal",
    )
    logged = events(c, cursor)
    listening = [e for e in logged if e["event"] == "listening"]
    assert listening
    assert listening[0]["address"] == f"{HOST}:{PORT}"
    assert {e["PRIORITY"] for e in listening} == {"6"}
    assert {e["PRIORITY"] for e in logged if e["event"] == "config_reload_failed"} == {"3"}
    for entry in c.journal("-u", "epolld.service", "--after-cursor", cursor):
        assert entry["SYSLOG_IDENTIFIER"] in ("epolld", "systemd")
        assert not str(entry.get("MESSAGE", "")).startswith("<"), "prefix must not leak"
    # What an operator filters with `journalctl -u epolld -p warning`, for this run only
    # (journalctl 252 finds nothing when -p is combined with --after-cursor).
    invocation = c.show("epolld.service", "InvocationID")
    warnings = c.run(
        "journalctl", "--no-pager", "-p", "warning", "-o", "cat",
        f"_SYSTEMD_INVOCATION_ID={invocation}",
    ).stdout  # fmt: skip
    assert "configuration reload failed" in warnings
    assert "listening on" not in warnings


def test_socket_activation_starts_on_first_connection(c: Container, cursor: str) -> None:
    """With epolld.socket, the first connection starts epolld, which serves systemd's socket."""
    drop_in(c, "epolld.socket", f"[Socket]\nListenStream=\nListenStream={HOST}:{SOCKET_PORT}\n")
    c.systemctl("start", "epolld.socket")
    assert c.show("epolld.service", "ActiveState") == "inactive"

    assert echo_once(SOCKET_PORT, b"wake up\n") == b"wake up\n"
    assert c.show("epolld.service", "ActiveState") == "active"
    pid = main_pid(c)
    logged = events(c, cursor)
    inherited = [e for e in logged if e["event"] == "socket_inherited"]
    assert [(e["name"], e["address"]) for e in inherited] == [("epolld", f"{HOST}:{SOCKET_PORT}")]
    assert refused(PORT), "inherited sockets replace `listen`"

    # A reload keeps the inherited socket, and `listen` stays ignored, with a warning.
    c.write_file("/etc/epolld.yaml", config_text(NEW_PORT))
    c.systemctl("reload", "epolld")
    wait_until(
        lambda: any(e["event"] == "listen_ignored" for e in events(c, cursor)),
        WAIT_S,
        "listen_ignored after the reload",
    )
    # Noted at start (info), warned about when a reload changes `listen` (warning).
    assert [e["PRIORITY"] for e in events(c, cursor) if e["event"] == "listen_ignored"] == [
        "6",
        "4",
    ]
    assert main_pid(c) == pid
    assert echo_once(SOCKET_PORT) == b"ping\n"
    assert refused(NEW_PORT)

    # Stopped, the service is started again by the next connection on the same socket.
    c.systemctl("stop", "epolld.service")
    assert echo_once(SOCKET_PORT, b"again\n") == b"again\n"
    assert main_pid(c) not in (0, pid)


def test_stop_drains_and_ends_inactive(c: Container) -> None:
    """systemctl stop echoes what was in flight, waits for the client, and ends inactive."""
    c.systemctl("start", "epolld")
    client = Client(PORT)
    try:
        assert client.echo(b"first\n") == b"first\n"
        client.sock.sendall(b"in flight\n")
        c.systemctl("stop", "--no-block", "epolld")
        c.wait_for_state("epolld.service", {"deactivating", "inactive", "failed"})
        assert client.receive(len(b"in flight\n")) == b"in flight\n"
        assert client.receive(1) == b"", "epolld ends its side (FIN) once it has echoed"
        assert c.show("epolld.service", "ActiveState") == "deactivating", "it waits for us"
        assert c.show("epolld.service", "StatusText").startswith("stopping")
        assert refused(PORT)
    finally:
        client.close()
    assert c.wait_for_state("epolld.service", {"inactive", "failed"}) == "inactive"
    assert c.show("epolld.service", "Result") == "success"
    assert c.show("epolld.service", "ExecMainStatus") == "0"


def test_drain_longer_than_stop_timeout_extends_it(c: Container, cursor: str) -> None:
    """A drain longer than TimeoutStopSec= gets EXTEND_TIMEOUT_USEC, so systemd does not kill it."""
    drop_in(c, "epolld.service", "[Service]\nTimeoutStopSec=1s\n")
    c.write_file("/etc/epolld.yaml", config_text(PORT).replace("10s", "3s"))
    c.systemctl("start", "epolld")
    client = Client(PORT)
    try:
        assert client.echo(b"hold on\n") == b"hold on\n"
        c.systemctl("stop", "--no-block", "epolld")
        # The client never closes: epolld cuts it when its own shutdown_timeout (3 s) ends,
        # after systemd's 1 s would have run out.
        wait_until(
            lambda: any(e["event"] == "shutdown_forced" for e in events(c, cursor)),
            WAIT_S,
            "epolld to end the drain itself",
        )
        assert c.wait_for_state("epolld.service", {"inactive", "failed"}) == "inactive"
        assert c.show("epolld.service", "Result") == "success", "not 'timeout': not killed"
    finally:
        client.close()


def test_status_text_reaches_systemd_as_utf8(c: Container) -> None:
    """Non-ASCII text and backslashes in STATUS reach systemd 252 intact, newlines as a space."""
    probe = (
        "from epolld.systemd import Notifier; import time; "
        "Notifier().ready('écho ✓ 日本 C:\\\\dir\\\\\\nREADY=0'); time.sleep(600)"
    )
    c.run(
        "systemd-run", "--unit=notify-probe", "--property=Type=notify",
        f"--setenv=PYTHONPATH={GUEST_REPO}", "/usr/bin/python3", "-c", probe,
    )  # fmt: skip
    try:
        assert c.show("notify-probe.service", "ActiveState") == "active"
        assert c.show("notify-probe.service", "StatusText") == "écho ✓ 日本 C:\\dir\\ READY=0"
    finally:
        c.systemctl("stop", "notify-probe.service", check=False)
