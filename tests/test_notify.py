"""epolld.systemd.Notifier against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from epolld.systemd import Notifier

RECV_TIMEOUT_S = 5.0
NOTIFY_BUFFER_BYTES = 4096  # systemd 252 reads notifications into a PIPE_BUF buffer


class FakeManager:
    """The receiving end of NOTIFY_SOCKET, as systemd's manager has it."""

    def __init__(self, address: str, bind_to: str | bytes) -> None:
        self.address = address  # what goes into NOTIFY_SOCKET
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(bind_to)
        self.sock.settimeout(RECV_TIMEOUT_S)

    def receive(self) -> bytes:
        return self.sock.recv(65536)

    def fields(self) -> dict[str, str]:
        lines = self.receive().decode("utf-8").split("\n")
        return dict(line.split("=", 1) for line in lines)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[FakeManager]:
    path = str(tmp_path / "notify")
    fake = FakeManager(path, path)
    yield fake
    fake.close()


def test_ready_sends_ready_and_status(manager: FakeManager) -> None:
    """ready() sends READY=1 and STATUS= in one datagram."""
    Notifier({"NOTIFY_SOCKET": manager.address}).ready("echoing on 127.0.0.1:7080")
    assert manager.receive() == b"READY=1\nSTATUS=echoing on 127.0.0.1:7080"


def test_non_ascii_status_arrives_as_utf8(manager: FakeManager) -> None:
    """Text outside ASCII, and outside Latin-1, reaches the manager as the same UTF-8 text."""
    text = "écho ✓ 日本語 — 3.1 MB/s"
    Notifier({"NOTIFY_SOCKET": manager.address}).status(text)
    assert manager.receive() == ("STATUS=" + text).encode("utf-8")


def test_newline_in_status_cannot_inject_fields(manager: FakeManager) -> None:
    """Control characters in STATUS become one space, so the text cannot add READY=1."""
    Notifier({"NOTIFY_SOCKET": manager.address}).status("bad\nREADY=1\r\tend:\n  \n  ^")
    assert manager.receive() == b"STATUS=bad READY=1 end: ^"


def test_backslash_is_doubled(manager: FakeManager) -> None:
    """A backslash is doubled, as systemd 252's parser takes a single one as an escape."""
    Notifier({"NOTIFY_SOCKET": manager.address}).fatal("bad escape \\q at end \\", errno=22)
    assert manager.receive() == b"STATUS=bad escape \\\\q at end \\\\\nERRNO=22"


def test_lone_surrogate_is_replaced(manager: FakeManager) -> None:
    """A lone surrogate (a surrogateescape'd byte) becomes U+FFFD instead of losing the message."""
    Notifier({"NOTIFY_SOCKET": manager.address}).status("file \udcff.yaml")
    assert manager.receive() == "STATUS=file \ufffd.yaml".encode()


def test_long_status_fits_systemds_buffer(manager: FakeManager) -> None:
    """An overlong STATUS is cut so the datagram fits systemd's notification buffer."""
    Notifier({"NOTIFY_SOCKET": manager.address}).ready("日" * 10_000)
    message = manager.receive()
    assert len(message) < NOTIFY_BUFFER_BYTES
    assert message.startswith("READY=1\nSTATUS=日日".encode())
    message.decode("utf-8")  # cut on a character boundary


def test_abstract_socket_address(tmp_path: Path) -> None:
    """A NOTIFY_SOCKET starting with '@' names a socket in the abstract namespace."""
    name = f"epolld-test-notify-{os.getpid()}-{tmp_path.name}"
    fake = FakeManager("@" + name, b"\0" + name.encode())
    try:
        Notifier({"NOTIFY_SOCKET": fake.address}).status("abstract")
        assert fake.receive() == b"STATUS=abstract"
    finally:
        fake.close()


def test_reloading_sends_monotonic_usec(manager: FakeManager) -> None:
    """reloading() sends RELOADING=1 with MONOTONIC_USEC read from CLOCK_MONOTONIC now."""
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    Notifier({"NOTIFY_SOCKET": manager.address}).reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    fields = manager.fields()
    assert fields["RELOADING"] == "1"
    assert before <= int(fields["MONOTONIC_USEC"]) <= after


def test_stopping_extend_timeout_and_fatal(manager: FakeManager) -> None:
    """stopping(), extend_timeout() and fatal() send the fields sd_notify(3) defines."""
    notifier = Notifier({"NOTIFY_SOCKET": manager.address})
    notifier.stopping("draining 3 connections")
    assert manager.receive() == b"STOPPING=1\nSTATUS=draining 3 connections"
    notifier.extend_timeout(2.5)
    assert manager.receive() == b"EXTEND_TIMEOUT_USEC=2500000"
    notifier.fatal("cannot bind 127.0.0.1:7080: address in use", errno=98)
    assert manager.receive() == b"STATUS=cannot bind 127.0.0.1:7080: address in use\nERRNO=98"
    notifier.fatal("bad config")
    assert manager.receive() == b"STATUS=bad config"


def test_watchdog_interval_is_half_of_watchdog_usec(manager: FakeManager) -> None:
    """The ping interval is half of WATCHDOG_USEC, and watchdog_ping() sends WATCHDOG=1."""
    notifier = Notifier({"NOTIFY_SOCKET": manager.address, "WATCHDOG_USEC": "3000000"})
    assert notifier.watchdog_interval_s() == 1.5
    notifier.watchdog_ping()
    assert manager.receive() == b"WATCHDOG=1"


def test_watchdog_with_our_pid_pings(manager: FakeManager) -> None:
    """WATCHDOG_PID equal to our PID means the watchdog is ours: pings are sent."""
    environ = {
        "NOTIFY_SOCKET": manager.address,
        "WATCHDOG_USEC": "2000000",
        "WATCHDOG_PID": str(os.getpid()),
    }
    notifier = Notifier(environ)
    assert notifier.watchdog_interval_s() == 1.0
    notifier.watchdog_ping()
    assert manager.receive() == b"WATCHDOG=1"


def test_watchdog_of_another_pid_is_not_ours(manager: FakeManager) -> None:
    """WATCHDOG_PID naming another process disables the interval and sends no ping."""
    other_pid = str(os.getpid() + 1)
    environ = {
        "NOTIFY_SOCKET": manager.address,
        "WATCHDOG_USEC": "2000000",
        "WATCHDOG_PID": other_pid,
    }
    notifier = Notifier(environ)
    assert notifier.watchdog_interval_s() is None
    notifier.watchdog_ping()
    notifier.status("after the ping")  # datagrams arrive in order: a ping would come first
    assert manager.receive() == b"STATUS=after the ping"


@pytest.mark.parametrize("usec", ["", "0", "-5", "soon"])
def test_watchdog_off_without_valid_watchdog_usec(manager: FakeManager, usec: str) -> None:
    """A missing, zero, negative or malformed WATCHDOG_USEC means no watchdog."""
    environ = {"NOTIFY_SOCKET": manager.address}
    if usec:
        environ["WATCHDOG_USEC"] = usec
    assert Notifier(environ).watchdog_interval_s() is None


def test_no_notify_socket_is_a_silent_no_op() -> None:
    """Without NOTIFY_SOCKET every method does nothing, raises nothing and logs nothing."""
    notifier = Notifier({"WATCHDOG_USEC": "2000000"})
    with capture_logs() as logs:
        assert not notifier.enabled
        assert notifier.watchdog_interval_s() is None
        notifier.ready("up")
        notifier.reloading()
        notifier.status("x")
        notifier.stopping("bye")
        notifier.extend_timeout(1)
        notifier.fatal("boom", errno=1)
        notifier.watchdog_ping()
    assert logs == []


def test_default_environ_is_os_environ(
    manager: FakeManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without an explicit environ the Notifier reads NOTIFY_SOCKET from os.environ."""
    monkeypatch.setenv("NOTIFY_SOCKET", manager.address)
    notifier = Notifier()
    assert notifier.enabled
    notifier.status("from os.environ")
    assert manager.receive() == b"STATUS=from os.environ"


def test_failed_send_is_logged_at_debug(tmp_path: Path) -> None:
    """A send to a socket nobody listens on does not raise and is logged at debug level."""
    missing = str(tmp_path / "nobody-here")
    with capture_logs() as logs:
        Notifier({"NOTIFY_SOCKET": missing}).ready("up")
    assert logs, "the failed send was not logged"
    assert {entry["event"] for entry in logs} == {"sd_notify_failed"}
    assert {entry["log_level"] for entry in logs} == {"debug"}
    assert logs[0]["socket"] == missing
    assert "No such file" in logs[0]["error"]


def test_reconnects_after_the_manager_socket_is_recreated(tmp_path: Path) -> None:
    """After systemd re-creates its socket (daemon-reexec), the next message still arrives."""
    path = str(tmp_path / "notify")
    first = FakeManager(path, path)
    notifier = Notifier({"NOTIFY_SOCKET": path})
    notifier.status("one")
    assert first.receive() == b"STATUS=one"
    first.close()
    os.unlink(path)
    second = FakeManager(path, path)
    try:
        notifier.status("two")
        assert second.receive() == b"STATUS=two"
    finally:
        second.close()
