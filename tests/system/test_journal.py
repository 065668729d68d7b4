"""epolld's journal entries under a real systemd 252 and journald: native-protocol fields,
priorities per level, filtering on EPOLLD_EVENT, and a traceback kept as one entry.

One container serves the module (conftest.py); each test starts from a stopped service
without drop-ins and a config on this test process's own loopback address.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import GUEST_REPO
from nspawn import Container, wait_until

pytestmark = pytest.mark.system

HOST = "127.0.0.1"  # inside the container's own network namespace (the c fixture)
PORT = 7080
WAIT_S = 30.0
IO_TIMEOUT_S = 10.0
DROP_IN = "/etc/systemd/system/epolld.service.d/test.conf"
PROBE = "/usr/local/lib/epolld-journal-probe.py"

# Runs in epolld.service's own sandbox (DynamicUser, SystemCallFilter=, ...): a real
# exception with a multi-line traceback, and an entry too large for one datagram.
PROBE_SCRIPT = """\
import structlog
from epolld.observability import journald
from epolld.observability import logsetup

logsetup.configure("info", "auto")
assert logsetup.journal_in_use(), "journald's native socket is not usable in the sandbox"
journal = journald.JournalSocket()  # the same SO_SNDBUF request as logsetup's
log = structlog.get_logger("epolld")


def parse_port(text):
    return int(text)


def read_config():
    return parse_port("not a number")


try:
    read_config()
except ValueError:
    log.exception("traceback_probe")
size = journal.send_buffer_bytes + 4096
log.info("large_probe", blob="x" * size + "\\nlast line", blob_bytes=size + 10)
"""
PROBE_UNIT = f"""\
[Service]
Type=oneshot
# Active after the probe exits, so that the InvocationID stays readable.
RemainAfterExit=yes
ExecStart=
ExecStart=/usr/bin/python3 {PROBE}
ExecReload=
Environment=PYTHONPATH={GUEST_REPO} PYTHONDONTWRITEBYTECODE=1
Restart=no
WatchdogSec=0
"""


def config_text(extra: str = "") -> str:
    return f'listen:\n  - "{HOST}:{PORT}"\n' + extra


def text(value: Any) -> str:
    """A journal JSON value as text: journalctl prints non-printable values as byte arrays."""
    if isinstance(value, list):
        return bytes(value).decode("utf-8")
    return str(value)


def entries(c: Container, *matches: str) -> list[dict[str, str]]:
    """epolld.service's journal entries (all fields, however long), values as text."""
    found = c.journal("--all", "-u", "epolld.service", *matches)
    return [{k: text(v) for k, v in e.items() if v is not None} for e in found]


def by_event(found: list[dict[str, str]], event: str) -> list[dict[str, str]]:
    return [e for e in found if e.get("EPOLLD_EVENT") == event]


def wait_for_event(c: Container, invocation: str, event: str) -> list[dict[str, str]]:
    """Entries of this invocation, once one with EPOLLD_EVENT=event is among them."""

    def found() -> list[dict[str, str]] | None:
        current = entries(c, f"_SYSTEMD_INVOCATION_ID={invocation}")
        return current if by_event(current, event) else None

    return wait_until(found, WAIT_S, f"{event} in the journal")


def start(c: Container, config: str) -> tuple[str, str]:
    """Start epolld on config; its (InvocationID, MainPID)."""
    c.write_file("/etc/epolld.yaml", config)
    c.systemctl("start", "epolld")
    return c.show("epolld.service", "InvocationID"), c.show("epolld.service", "MainPID")


def connect() -> socket.socket:
    return socket.create_connection((HOST, PORT), timeout=IO_TIMEOUT_S)


def echo(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    data = b""
    while len(data) < len(payload):
        chunk = sock.recv(len(payload) - len(data))
        if not chunk:
            break
        data += chunk
    return data


def reload_with_broken_config(c: Container) -> None:
    """SIGHUP with a file that is valid YAML but an invalid config (skipping ExecReload's
    check, as `kill -HUP` by hand does)."""
    c.write_file("/etc/epolld.yaml", "listen: 7080\n")
    c.systemctl("kill", "--kill-who=main", "--signal=HUP", "epolld")


@pytest.fixture
def c(epolld_container: Container) -> Iterator[Container]:
    """The module's container with epolld stopped and no drop-ins; the test's sockets are
    created in the container's network namespace."""
    container = epolld_container
    container.systemctl("stop", "epolld.socket", "epolld.service")
    container.systemctl("reset-failed", check=False)
    container.sh(f"rm -f {DROP_IN}")
    container.systemctl("daemon-reload")
    with container.network():
        yield container
    container.systemctl("stop", "epolld.service", check=False)
    container.sh(f"rm -f {DROP_IN}")
    container.systemctl("daemon-reload")


def test_entries_carry_each_field(c: Container) -> None:
    """A closed connection is one native entry with a readable MESSAGE and each field as
    EPOLLD_*; everything the daemon logs arrives over the native protocol, none as stdout."""
    invocation, pid = start(c, config_text("logging:\n  connections: true\n"))
    client = connect()
    try:
        assert echo(client, b"ping\n") == b"ping\n"
        host, port = client.getsockname()[:2]
    finally:
        client.close()
    peer = f"{host}:{port}"
    found = wait_for_event(c, invocation, "connection_closed")

    (closed,) = by_event(found, "connection_closed")
    assert closed["MESSAGE"] == f"connection closed: {peer}, 5 bytes in, 5 out, eof"
    expected = {
        "PRIORITY": "6",
        "SYSLOG_IDENTIFIER": "epolld",
        "EPOLLD_EVENT": "connection_closed",
        "EPOLLD_PEER": peer,
        "EPOLLD_BYTES_IN": "5",
        "EPOLLD_BYTES_OUT": "5",
        "EPOLLD_REASON": "eof",
        "_TRANSPORT": "journal",
        "_SYSTEMD_UNIT": "epolld.service",
        "_PID": pid,
    }
    assert {k: closed.get(k) for k in expected} == expected
    assert closed["EPOLLD_FD"].isdigit()
    assert float(closed["EPOLLD_DURATION_S"]) >= 0
    assert "EPOLLD_ERROR" not in closed, "a None field is left out"

    (opened,) = by_event(found, "connection_opened")
    assert opened["MESSAGE"] == f"connection opened: {peer} on {HOST}:{PORT}"
    assert opened["EPOLLD_LISTENER"] == f"{HOST}:{PORT}"
    (listening,) = by_event(found, "listening")
    assert listening["MESSAGE"] == f"listening on {HOST}:{PORT}"
    assert (listening["EPOLLD_ADDRESS"], listening["EPOLLD_TRIGGER"]) == (f"{HOST}:{PORT}", "level")
    assert listening["EPOLLD_INHERITED"] == "false"

    daemon = [e for e in found if e.get("_PID") == pid]
    assert {e["_TRANSPORT"] for e in daemon} == {"journal"}, "no line may go through stdout"
    assert all(e.get("SYSLOG_IDENTIFIER") == "epolld" for e in daemon)
    assert not [e for e in daemon if e["MESSAGE"].startswith(("{", "<"))]


def test_priorities_follow_levels(c: Container) -> None:
    """debug, info, warning and error events get PRIORITY 7, 6, 4 and 3, and
    `journalctl -p warning` shows only the warning and the error."""
    extra = "limits:\n  max_connections: 1\nlogging:\n  level: debug\n"
    invocation, _ = start(c, config_text(extra))
    held = connect()
    try:
        assert echo(held, b"held\n") == b"held\n"
        refused = connect()  # over max_connections: accepted and closed at once
        try:
            assert refused.recv(1) == b""
        finally:
            refused.close()
        reload_with_broken_config(c)
        found = wait_for_event(c, invocation, "config_reload_failed")
    finally:
        held.close()

    def priorities(event: str) -> set[str]:
        return {e["PRIORITY"] for e in by_event(found, event)}

    assert priorities("connection_opened") == {"7"}  # debug: connection logs are off
    assert priorities("listening") == {"6"}
    assert priorities("connection_refused") == {"4"}
    assert priorities("config_reload_failed") == {"3"}

    # What an operator filters with -p (journalctl 252 finds nothing when -p is combined with
    # --after-cursor, so the invocation scopes it).
    warnings = c.journal("-p", "warning", f"_SYSTEMD_INVOCATION_ID={invocation}")
    events = {e.get("EPOLLD_EVENT") for e in warnings if e.get("_TRANSPORT") == "journal"}
    assert events == {"connection_refused", "config_reload_failed"}


def test_event_filter_finds_the_failed_reload(c: Container) -> None:
    """`journalctl -u epolld EPOLLD_EVENT=config_reload_failed` finds the failed reload, with
    the reason in MESSAGE and EPOLLD_ERROR, and nothing else."""
    invocation, _ = start(c, config_text())
    reload_with_broken_config(c)
    wait_for_event(c, invocation, "config_reload_failed")

    found = c.journal("-u", "epolld", "EPOLLD_EVENT=config_reload_failed")
    assert {e["EPOLLD_EVENT"] for e in found} == {"config_reload_failed"}
    (ours,) = [e for e in found if e["_SYSTEMD_INVOCATION_ID"] == invocation]
    assert ours["EPOLLD_ERROR"].startswith("/etc/epolld.yaml:1: listen:")
    assert ours["MESSAGE"] == (
        "configuration reload failed, the old one stays in force: " + ours["EPOLLD_ERROR"]
    )
    assert c.show("epolld.service", "ActiveState") == "active"
    cat = c.run(
        "journalctl", "--no-pager", "-o", "cat", "-u", "epolld",
        "EPOLLD_EVENT=config_reload_failed", f"_SYSTEMD_INVOCATION_ID={invocation}",
    ).stdout  # fmt: skip
    assert cat.startswith("configuration reload failed, the old one stays in force: ")


def test_traceback_and_large_entry_are_one_entry_each(c: Container) -> None:
    """In epolld.service's sandbox, a logged exception's multi-line traceback is one entry, and
    an entry larger than a datagram arrives whole (through a memfd)."""
    c.write_file(PROBE, PROBE_SCRIPT)
    c.write_file(DROP_IN, PROBE_UNIT)
    c.systemctl("daemon-reload")
    c.systemctl("start", "epolld")  # oneshot: returns when the probe has exited
    assert c.show("epolld.service", "Result") == "success"
    invocation = c.show("epolld.service", "InvocationID")
    found = entries(c, f"_SYSTEMD_INVOCATION_ID={invocation}")

    (entry,) = by_event(found, "traceback_probe")
    lines = entry["MESSAGE"].splitlines()
    assert lines[0] == "traceback_probe"
    assert lines[1] == "Traceback (most recent call last):"
    assert lines[-1] == "ValueError: invalid literal for int() with base 10: 'not a number'"
    assert sum(line.lstrip().startswith("File ") for line in lines) == 3  # three frames
    assert entry["EPOLLD_TRACEBACK"].rstrip("\n").splitlines() == lines[1:]
    assert (entry["PRIORITY"], entry["_TRANSPORT"]) == ("3", "journal")
    split = [e for e in found if e is not entry and "Traceback" in e.get("MESSAGE", "")]
    assert not split, "no part of the traceback may be an entry of its own"
    assert not [e for e in found if e.get("MESSAGE", "").lstrip().startswith("File ")]

    (large,) = by_event(found, "large_probe")
    assert len(large["EPOLLD_BLOB"]) == int(large["EPOLLD_BLOB_BYTES"])
    assert large["EPOLLD_BLOB"].endswith("x\nlast line")
    assert len(large["MESSAGE"]) < 300, "MESSAGE stays short; the field has it all"


# What a systemd package upgrade stops; stopping the service alone would leave its sockets
# to start it again at the next entry.
JOURNALD_UNITS = (
    "systemd-journald.socket",
    "systemd-journald-dev-log.socket",
    "systemd-journald-audit.socket",
    "systemd-journald.service",
)


def test_daemon_survives_journald_stopping(c: Container) -> None:
    """With journald's units stopped under the running service (its socket refused, stdout
    a broken pipe), a connected client still echoes, new clients are served and the service
    stays active with the same MainPID; once journald is started again, new entries arrive,
    with one log_lines_dropped entry carrying the count."""
    invocation, pid = start(c, config_text("logging:\n  connections: true\n"))
    client = connect()
    try:
        assert echo(client, b"before\n") == b"before\n"
        wait_for_event(c, invocation, "connection_opened")
        try:
            c.systemctl("stop", *JOURNALD_UNITS)
            assert c.show("systemd-journald.service", "ActiveState") == "inactive"
            payload = bytes(range(256)) * 256
            for i in range(10):  # each logs connection_opened and connection_closed
                other = connect()
                with other:
                    data = payload + str(i).encode()
                    assert echo(other, data) == data
                assert echo(client, data) == data
            c.systemctl("kill", "--kill-who=main", "--signal=USR1", "epolld")  # a stats line
            assert echo(client, b"still here\n") == b"still here\n"
            assert c.show("epolld.service", "ActiveState") == "active"
            assert c.show("epolld.service", "MainPID") == pid
        finally:
            c.systemctl("start", *JOURNALD_UNITS, check=False)
        assert c.show("systemd-journald.service", "ActiveState") == "active"

        def reported() -> list[dict[str, str]] | None:
            # The daemon tries journald's socket again once a second: log until it does.
            with connect() as probe:
                assert echo(probe, b"after\n") == b"after\n"
            current = entries(c, f"_SYSTEMD_INVOCATION_ID={invocation}")
            return current if by_event(current, "log_lines_dropped") else None

        found = wait_until(reported, WAIT_S, "log_lines_dropped in the journal")
        assert echo(client, b"after\n") == b"after\n"
    finally:
        client.close()
    (report,) = by_event(found, "log_lines_dropped")
    assert int(report["EPOLLD_DROPPED"]) >= 20, "the 10 clients' opened and closed lines"
    assert (report["PRIORITY"], report["_TRANSPORT"], report["_PID"]) == ("4", "journal", pid)
    assert c.show("epolld.service", "MainPID") == pid
    c.systemctl("kill", "--kill-who=main", "--signal=USR1", "epolld")
    stats = by_event(wait_for_event(c, invocation, "stats"), "stats")
    assert int(stats[-1]["EPOLLD_LOG_LINES_DROPPED"]) >= int(report["EPOLLD_DROPPED"])
