"""journald support: JOURNAL_STREAM detection, priority prefixes, and the native protocol sink
against a real AF_UNIX datagram socket in tmp_path standing in for journald's."""

from __future__ import annotations

import array
import contextlib
import fcntl
import io
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import pytest
import structlog

from epolld.observability import journald, logsetup
from epolld.observability.journald import (
    encode_entry,
    field_name,
    priority_prefix,
    stdout_is_journal,
)

REPORT = "from epolld.observability.journald import stdout_is_journal; print(stdout_is_journal())"


def stream_id(fd: int) -> str:
    st = os.fstat(fd)
    return f"{st.st_dev}:{st.st_ino}"


def test_matching_stream_is_the_journal(tmp_path: Path) -> None:
    """A descriptor whose device:inode equals JOURNAL_STREAM is recognised as the journal."""
    with open(tmp_path / "stream", "w") as f:
        assert stdout_is_journal({"JOURNAL_STREAM": stream_id(f.fileno())}, fd=f.fileno())


def test_other_stream_is_not_the_journal(tmp_path: Path) -> None:
    """A JOURNAL_STREAM inherited from a parent whose stdout differs from ours is ignored."""
    with open(tmp_path / "journal", "w") as journal, open(tmp_path / "other", "w") as other:
        environ = {"JOURNAL_STREAM": stream_id(journal.fileno())}
        assert not stdout_is_journal(environ, fd=other.fileno())


@pytest.mark.parametrize("value", [None, "", "12", "a:b", "1:2:3"])
def test_missing_or_malformed_journal_stream(tmp_path: Path, value: str | None) -> None:
    """Without a well-formed JOURNAL_STREAM nothing is the journal."""
    environ = {} if value is None else {"JOURNAL_STREAM": value}
    with open(tmp_path / "stream", "w") as f:
        assert not stdout_is_journal(environ, fd=f.fileno())


def test_closed_stdout_is_not_the_journal(tmp_path: Path) -> None:
    """A closed descriptor is not the journal, and checking it does not raise."""
    with open(tmp_path / "stream", "w") as f:
        environ = {"JOURNAL_STREAM": stream_id(f.fileno())}
        fd = os.dup(f.fileno())
    os.close(fd)
    assert not stdout_is_journal(environ, fd=fd)


def test_process_stdout_checked_by_default(tmp_path: Path) -> None:
    """By default the process's own stdout (fd 1) is compared with os.environ's JOURNAL_STREAM."""
    out_path = tmp_path / "stdout"
    with open(out_path, "w") as out:
        env = {**os.environ, "JOURNAL_STREAM": stream_id(out.fileno())}
        subprocess.run([sys.executable, "-c", REPORT], env=env, stdout=out, check=True, timeout=30)
    assert out_path.read_text() == "True\n"
    piped = subprocess.run(
        [sys.executable, "-c", REPORT], env=env, capture_output=True, text=True, timeout=30
    )
    assert piped.stdout == "False\n", "a redirected stdout must not count as the journal"


@pytest.mark.parametrize(
    ("level", "prefix"),
    [
        ("trace", "<7>"),
        ("debug", "<7>"),
        ("info", "<6>"),
        ("warning", "<4>"),
        ("warn", "<4>"),
        ("error", "<3>"),
        ("exception", "<3>"),
        ("critical", "<2>"),
        ("WARNING", "<4>"),
    ],
)
def test_priority_prefix(level: str, prefix: str) -> None:
    """structlog level names map to syslog(3) priorities as journald reads them."""
    assert priority_prefix(level) == prefix


def test_unknown_level_has_no_prefix() -> None:
    """An unknown level gets no prefix, leaving journald's default (info) in place."""
    assert priority_prefix("chatty") == ""


# -- the native protocol, received on a real socket -----------------------------------------

RECV_TIMEOUT_S = 10.0
FULL_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


def parse_entry(data: bytes) -> list[tuple[str, bytes]]:
    """Fields of one native-protocol entry, decoded as journald does (both forms)."""
    fields = []
    pos = 0
    while pos < len(data):
        end = data.index(b"\n", pos)
        line = data[pos:end]
        if b"=" in line:
            name, _, value = line.partition(b"=")
            pos = end + 1
        else:  # NAME\n, little-endian 64-bit length, value, \n
            name = line
            size = int.from_bytes(data[end + 1 : end + 9], "little")
            value = data[end + 9 : end + 9 + size]
            assert data[end + 9 + size : end + 10 + size] == b"\n", "value must end in a newline"
            pos = end + 10 + size
        fields.append((name.decode("ascii"), value))
    return fields


class FakeJournal:
    """The receiving end of journald's native socket, bound in tmp_path."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(RECV_TIMEOUT_S)
        self.memfds = 0  # entries that came in a memfd

    def receive_raw(self) -> bytes:
        """One datagram's entry: its payload, or the content of the memfd it carries."""
        fd_space = socket.CMSG_SPACE(array.array("i", [0]).itemsize * 2)
        payload, ancdata, flags, _ = self.sock.recvmsg(64 * 1024 * 1024, fd_space)
        assert not flags & socket.MSG_CTRUNC
        fds = array.array("i")
        for level, kind, data in ancdata:
            assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
        if not fds:
            return payload
        try:
            # The protocol: an empty payload with exactly one fully sealed memfd.
            assert payload == b""
            assert len(fds) == 1
            assert fcntl.fcntl(fds[0], fcntl.F_GET_SEALS) & FULL_SEALS == FULL_SEALS
            self.memfds += 1
            size = os.fstat(fds[0]).st_size
            return os.pread(fds[0], size, 0)
        finally:
            for fd in fds:
                os.close(fd)

    def receive(self) -> dict[str, str]:
        """One entry as a dict; a field sent twice fails the test."""
        fields = parse_entry(self.receive_raw())
        entry = {name: value.decode("utf-8") for name, value in fields}
        assert len(entry) == len(fields), f"duplicate fields in {fields}"
        return entry

    def pending(self) -> bool:
        """Whether another datagram is queued (sends are synchronous: no waiting needed)."""
        self.sock.setblocking(False)
        try:
            self.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return False
        finally:
            self.sock.settimeout(RECV_TIMEOUT_S)
        return True

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[FakeJournal]:
    fake = FakeJournal(tmp_path / "journal.socket")
    yield fake
    fake.close()


@pytest.fixture
def journal_stream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TextIO]:
    """A file that JOURNAL_STREAM names, as systemd names a service's stdout; structlog is
    back to its defaults (and the journal socket closed) afterwards."""
    with open(tmp_path / "stdout", "w+") as stream:
        monkeypatch.setenv("JOURNAL_STREAM", stream_id(stream.fileno()))
        yield stream
        logsetup.configure("info", "json", stream=sys.stdout)
        structlog.reset_defaults()


def lines(stream: TextIO) -> list[str]:
    stream.flush()
    stream.seek(0)
    return stream.read().splitlines()


def configure(stream: TextIO, journal: FakeJournal, level: str = "info") -> None:
    logsetup.configure(level, "auto", stream=stream, journal_socket=journal.path)


log = structlog.get_logger("epolld")


def test_encoding_follows_the_protocol_document() -> None:
    """Plain values are NAME=value lines; a value with a newline gets the length-prefixed form."""
    assert encode_entry([("FOO", "BAR")]) == b"FOO=BAR\n"
    assert encode_entry([("MESSAGE", "two\nlines"), ("PRIORITY", "3")]) == (
        b"MESSAGE\n\x09\x00\x00\x00\x00\x00\x00\x00two\nlines\nPRIORITY=3\n"
    )
    assert parse_entry(encode_entry([("BLOB", b"xx\nx\x00=\n"), ("A", "=")])) == [
        ("BLOB", b"xx\nx\x00=\n"),
        ("A", b"="),
    ]


def test_connection_closed_is_one_structured_entry(
    journal: FakeJournal, journal_stream: TextIO
) -> None:
    """A connection_closed event becomes one entry: a readable MESSAGE, PRIORITY, the
    identifier, and each field as an EPOLLD_ field; nothing is written to stdout."""
    configure(journal_stream, journal)
    assert logsetup.journal_in_use()
    log.info(
        "connection_closed",
        peer="127.0.0.1:43454",
        fd=7,
        bytes_in=6,
        bytes_out=6,
        duration_s=0.25,
        reason="eof",
        error=None,
    )
    assert journal.receive() == {
        "MESSAGE": "connection closed: 127.0.0.1:43454, 6 bytes in, 6 out, eof",
        "PRIORITY": "6",
        "SYSLOG_IDENTIFIER": "epolld",
        "EPOLLD_EVENT": "connection_closed",
        "EPOLLD_PEER": "127.0.0.1:43454",
        "EPOLLD_FD": "7",
        "EPOLLD_BYTES_IN": "6",
        "EPOLLD_BYTES_OUT": "6",
        "EPOLLD_DURATION_S": "0.25",
        "EPOLLD_REASON": "eof",
    }, "error=None is left out; level and timestamp are the journal's own"
    assert not journal.pending()
    assert lines(journal_stream) == []


def test_error_is_appended_to_the_sentence(journal: FakeJournal, journal_stream: TextIO) -> None:
    """An event's error is named in its MESSAGE and kept as EPOLLD_ERROR."""
    configure(journal_stream, journal)
    log.error("config_reload_failed", error="/etc/epolld.yaml:1: listen: must be a list")
    entry = journal.receive()
    assert entry["MESSAGE"] == (
        "configuration reload failed, the old one stays in force: "
        "/etc/epolld.yaml:1: listen: must be a list"
    )
    assert entry["EPOLLD_ERROR"] == "/etc/epolld.yaml:1: listen: must be a list"
    assert entry["PRIORITY"] == "3"


@pytest.mark.parametrize(
    ("method", "priority"),
    [("debug", "7"), ("info", "6"), ("warning", "4"), ("error", "3"), ("critical", "2")],
)
def test_priority_follows_the_level(
    journal: FakeJournal, journal_stream: TextIO, method: str, priority: str
) -> None:
    """Each structlog level is sent as its syslog(3) PRIORITY."""
    configure(journal_stream, journal, level="debug")
    getattr(log, method)("probe")
    assert journal.receive()["PRIORITY"] == priority


def test_level_filter_applies_before_sending(journal: FakeJournal, journal_stream: TextIO) -> None:
    """Events below the configured level are not sent at all."""
    configure(journal_stream, journal, level="warning")
    log.info("quiet")
    log.warning("loud")
    assert journal.receive()["EPOLLD_EVENT"] == "loud"
    assert not journal.pending()


def lookup(table: dict[str, int], key: str) -> int:
    return table[key]


def test_traceback_is_one_entry(journal: FakeJournal, journal_stream: TextIO) -> None:
    """log.exception() sends one datagram: the traceback in MESSAGE after the sentence and in
    EPOLLD_TRACEBACK, both in the binary-safe form."""
    configure(journal_stream, journal)
    try:
        lookup({"present": 1}, "missing")
    except KeyError:
        log.exception("loop_crashed")
    raw = journal.receive_raw()
    assert not journal.pending(), "a traceback must not be split into entries"
    assert b"\nMESSAGE\n" in b"\n" + raw
    assert b"\nEPOLLD_TRACEBACK\n" in raw
    entry = {name: value.decode() for name, value in parse_entry(raw)}
    first, *rest = entry["MESSAGE"].splitlines()
    assert first == "event loop crashed"
    assert rest[0] == "Traceback (most recent call last):"
    assert rest[-1] == "KeyError: 'missing'"
    assert entry["EPOLLD_TRACEBACK"].rstrip("\n").splitlines() == rest
    assert entry["PRIORITY"] == "3"
    assert "EPOLLD_EXCEPTION" not in entry
    assert "EPOLLD_EXC_INFO" not in entry


def test_field_names_are_valid_journal_fields(journal: FakeJournal, journal_stream: TextIO) -> None:
    """Any key becomes an upper-case name of A-Z, 0-9 and _ that journald accepts (not
    starting with _ or a digit, at most 64 characters)."""
    configure(journal_stream, journal)
    keys = {"a-b": 1, "weird key é": 2, "1st": 3, "_hidden": 4, "x" * 80: 5, "ok": 6}
    log.info("keys", **keys)
    names = [name for name in journal.receive() if name.startswith("EPOLLD_")]
    assert names == [
        "EPOLLD_EVENT",
        "EPOLLD_A_B",
        "EPOLLD_WEIRD_KEY__",
        "EPOLLD_1ST",
        "EPOLLD__HIDDEN",
        ("EPOLLD_" + "X" * 80)[:64],
        "EPOLLD_OK",
    ]
    assert all(re.fullmatch("[A-Z][A-Z0-9_]{0,63}", n) for n in names)
    assert field_name("peer") == "EPOLLD_PEER"


def test_values_other_than_text_are_json(journal: FakeJournal, journal_stream: TextIO) -> None:
    """Numbers, booleans, lists and mappings are sent as their JSON text, strings as they are."""
    configure(journal_stream, journal)
    log.info(
        "config_reloaded",
        changes={"trigger": ["level", "edge"]},
        listen=["127.0.0.1:7080"],
        paused=False,
        ratio=0.5,
        text='say "hi"',
    )
    entry = journal.receive()
    assert entry["EPOLLD_CHANGES"] == '{"trigger":["level","edge"]}'
    assert entry["EPOLLD_LISTEN"] == '["127.0.0.1:7080"]'
    assert (entry["EPOLLD_PAUSED"], entry["EPOLLD_RATIO"]) == ("false", "0.5")
    assert entry["EPOLLD_TEXT"] == 'say "hi"'
    assert entry["MESSAGE"] == "configuration reloaded"


def test_any_event_gets_a_readable_default_message(
    journal: FakeJournal, journal_stream: TextIO
) -> None:
    """An event without a sentence of its own reads "name key=value ...", quoting where needed;
    so does one logged without a field its sentence names."""
    configure(journal_stream, journal)
    log.warning("something_odd", fd=3, why="no idea", empty="", missing=None)
    log.info("listening", fd=4)  # its sentence names the address
    assert journal.receive()["MESSAGE"] == 'something_odd fd=3 why="no idea" empty=""'
    assert journal.receive()["MESSAGE"] == "listening fd=4"
    log.info("long_one", blob="y" * 1000)
    entry = journal.receive()
    assert entry["MESSAGE"] == "long_one blob=" + "y" * 199 + "…", "MESSAGE stays short"
    assert entry["EPOLLD_BLOB"] == "y" * 1000


def test_newline_in_a_value_stays_in_one_entry(
    journal: FakeJournal, journal_stream: TextIO
) -> None:
    """A field value holding newlines (a multi-line error) arrives intact in one entry."""
    configure(journal_stream, journal)
    log.error("config_reload_failed", error="line one\nline two\n")
    entry = journal.receive()
    assert entry["EPOLLD_ERROR"] == "line one\nline two\n"
    assert entry["MESSAGE"].endswith(": line one\nline two\n")
    assert not journal.pending()


def test_entry_larger_than_a_datagram_goes_in_a_sealed_memfd(
    journal: FakeJournal, journal_stream: TextIO
) -> None:
    """An entry over the socket's send buffer (EMSGSIZE) is passed as a sealed memfd with
    SCM_RIGHTS and an empty payload, and arrives whole."""
    configure(journal_stream, journal)
    probe = journald.JournalSocket(journal.path)
    send_buffer = probe.send_buffer_bytes
    probe.close()
    big = "x" * (send_buffer + 4096) + "\nend"
    log.error("big_one", blob=big)
    entry = journal.receive()
    assert journal.memfds == 1
    assert entry["EPOLLD_BLOB"] == big
    assert entry["EPOLLD_EVENT"] == "big_one"
    log.info("small_one")
    assert journal.receive()["EPOLLD_EVENT"] == "small_one"
    assert journal.memfds == 1, "a small entry is a plain datagram again"


def test_without_a_journal_socket_lines_go_to_stdout(
    tmp_path: Path, journal_stream: TextIO
) -> None:
    """With nothing listening on the socket path, events are "<N>"-prefixed JSON lines on the
    journal stream, as before."""
    logsetup.configure("info", "auto", stream=journal_stream, journal_socket=str(tmp_path / "none"))
    assert not logsetup.journal_in_use()
    log.warning("accept_failed", address="127.0.0.1:7080", error="EPERM")
    (line,) = lines(journal_stream)
    assert line.startswith("<4>{")
    event = json.loads(line[3:])
    assert (event["event"], event["address"], event["level"]) == (
        "accept_failed",
        "127.0.0.1:7080",
        "warning",
    )


def test_a_socket_nobody_reads_is_not_used(tmp_path: Path, journal_stream: TextIO) -> None:
    """A socket file whose listener has gone (journald stopped) counts as no journal."""
    dead = FakeJournal(tmp_path / "dead.socket")
    dead.sock.close()  # the path stays, nothing is bound to it
    try:
        logsetup.configure("info", "auto", stream=journal_stream, journal_socket=dead.path)
        assert not logsetup.journal_in_use()
    finally:
        dead.close()


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_failed_send_writes_the_line_and_recovers(
    tmp_path: Path, journal: FakeJournal, journal_stream: TextIO
) -> None:
    """If sending fails at run time (journald gone), the event is written as a line on stdout;
    once journald listens at the path again, entries go to it again."""
    clock = Clock()
    logsetup.configure(
        "info", "auto", stream=journal_stream, journal_socket=journal.path, clock=clock
    )
    journal.close()  # journald stops: its socket is gone
    log.error("config_reload_failed", error="bad")
    (line,) = lines(journal_stream)
    assert line.startswith("<3>{")
    assert json.loads(line[3:])["event"] == "config_reload_failed"

    restarted = FakeJournal(Path(journal.path))
    try:
        clock.now += logsetup.RETRY_S  # the socket is tried again once a second at most
        log.info("listening", address="127.0.0.1:7080")
        assert restarted.receive()["MESSAGE"] == "listening on 127.0.0.1:7080"
    finally:
        restarted.close()
    assert len(lines(journal_stream)) == 1


def test_stream_that_is_not_the_journal_gets_plain_lines(
    tmp_path: Path, journal: FakeJournal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stdout other than the journal stream gets JSON lines without prefix, even with the
    journal socket available."""
    with open(tmp_path / "journal-stream", "w") as other:
        monkeypatch.setenv("JOURNAL_STREAM", stream_id(other.fileno()))
        with open(tmp_path / "redirected", "w+") as stream:
            try:
                configure(stream, journal)
                assert not logsetup.journal_in_use()
                log.info("listening", address="127.0.0.1:7080")
                (line,) = lines(stream)
            finally:
                logsetup.configure("info", "json", stream=sys.stdout)
                structlog.reset_defaults()
    assert json.loads(line)["event"] == "listening"
    assert not journal.pending()


def test_explicit_json_format_keeps_prefixed_lines(
    journal: FakeJournal, journal_stream: TextIO
) -> None:
    """format: json on the journal stream keeps "<N>"-prefixed JSON lines: only auto switches."""
    logsetup.configure("info", "json", stream=journal_stream, journal_socket=journal.path)
    assert not logsetup.journal_in_use()
    log.info("listening", address="127.0.0.1:7080")
    (line,) = lines(journal_stream)
    assert line.startswith("<6>{")
    assert not journal.pending()


def test_reconfiguring_keeps_the_socket_for_loggers_bound_before(
    journal: FakeJournal, journal_stream: TextIO
) -> None:
    """A reload that reconfigures logging keeps the journal socket: a logger bound before it
    still reaches the journal."""
    configure(journal_stream, journal)
    bound = log.bind(peer="127.0.0.1:1")
    bound.info("before")
    configure(journal_stream, journal, level="debug")
    bound.info("after")
    log.debug("new_level")
    assert [journal.receive()["EPOLLD_EVENT"] for _ in range(3)] == [
        "before",
        "after",
        "new_level",
    ]
    assert lines(journal_stream) == []


def test_close_leaves_a_reused_descriptor_alone(tmp_path: Path, journal: FakeJournal) -> None:
    """If the socket's descriptor was closed under it (python-daemon closes every descriptor)
    and reused, close() does not close the new owner's file."""
    sock = journald.JournalSocket(journal.path)
    fd = sock._sock.fileno()
    os.close(fd)
    with open(tmp_path / "reused", "w") as reused:
        assert reused.fileno() == fd
        sock.close()
        os.fstat(reused.fileno())  # still open
        reused.write("still ours")


# -- output that takes nothing: journald stopped, a full or broken pipe (issue 20) --------


@pytest.fixture
def pipe_stream(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[int, TextIO]]:
    """stdout as systemd gives it to a service: the journal stream (here a pipe, read end
    first), named by JOURNAL_STREAM; structlog is back to its defaults afterwards."""
    # Drops an earlier test left unreported are reported now, elsewhere.
    logsetup.configure("info", "json", stream=io.StringIO())
    log.info("probe")
    read_fd, write_fd = os.pipe()
    stream = open(write_fd, "w")  # noqa: SIM115 (closed below, after reconfiguring)
    monkeypatch.setenv("JOURNAL_STREAM", stream_id(write_fd))
    try:
        yield read_fd, stream
    finally:
        logsetup.configure("info", "json", stream=sys.stdout)
        structlog.reset_defaults()
        with contextlib.suppress(OSError):
            stream.close()  # its buffer is empty: lines go to the descriptor
        with contextlib.suppress(OSError):
            os.close(read_fd)


def fill_pipe(write_fd: int) -> None:
    """Write into a pipe until it has no room left."""
    os.set_blocking(write_fd, False)
    try:
        with contextlib.suppress(BlockingIOError):
            while True:
                os.write(write_fd, b"x" * 4096)
    finally:
        os.set_blocking(write_fd, True)
    with contextlib.suppress(BlockingIOError):  # what is left is less than a page
        os.set_blocking(write_fd, False)
        os.write(write_fd, b"x" * 1)
    os.set_blocking(write_fd, True)


def drain_pipe(read_fd: int) -> bytes:
    """Everything a pipe holds now."""
    os.set_blocking(read_fd, False)
    chunks = []
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(read_fd, 65536):
            chunks.append(chunk)
    os.set_blocking(read_fd, True)
    return b"".join(chunks)


def test_broken_stdout_drops_lines_instead_of_raising(
    pipe_stream: tuple[int, TextIO],
) -> None:
    """With stdout a pipe nobody reads any more (journald stopped), a JSON log line is
    dropped and counted; the logging call does not raise."""
    read_fd, stream = pipe_stream
    os.close(read_fd)
    logsetup.configure("info", "json", stream=stream)
    before = logsetup.dropped_lines()
    log.info("listening", address="127.0.0.1:7080")
    log.warning("accept_failed", address="127.0.0.1:7080", error="EPERM")
    assert logsetup.dropped_lines() == before + 2


def test_full_stdout_drops_and_reports_once_when_room_comes(
    pipe_stream: tuple[int, TextIO],
) -> None:
    """A line that finds a full pipe is dropped after a bounded wait (the logging call
    returns); once the reader makes room, lines are written again, the first followed by
    one log_lines_dropped warning with the count."""
    read_fd, stream = pipe_stream
    fill_pipe(stream.fileno())
    clock = Clock()
    logsetup.configure("info", "json", stream=stream, clock=clock)
    before = logsetup.dropped_lines()
    done = threading.Event()

    def log_two() -> None:
        log.info("first")
        log.info("second")  # within RETRY_S: dropped without waiting
        done.set()

    writer = threading.Thread(target=log_two, daemon=True)
    writer.start()
    writer.join(RECV_TIMEOUT_S)
    assert done.is_set(), "logging to a full pipe must not block"
    assert logsetup.dropped_lines() == before + 2
    drain_pipe(read_fd)
    log.info("third")  # still within RETRY_S of the failure
    assert drain_pipe(read_fd) == b""
    clock.now += logsetup.RETRY_S
    log.info("fourth")
    log.info("fifth")
    written = drain_pipe(read_fd).decode().splitlines()
    assert [line[:3] for line in written] == ["<6>", "<4>", "<6>"]
    events = [json.loads(line[3:]) for line in written]
    assert [e["event"] for e in events] == ["fourth", "log_lines_dropped", "fifth"]
    report = events[1]
    assert (report["level"], report["dropped"]) == ("warning", 3)
    assert report["dropped_total"] == logsetup.dropped_lines() == before + 3
    assert "no room" in report["error"]


def test_journal_and_stdout_gone_then_journal_back(
    journal: FakeJournal, pipe_stream: tuple[int, TextIO]
) -> None:
    """journald stopped (socket refused, stdout stream broken): entries are dropped and
    counted without raising, the socket is not tried again for RETRY_S, and once journald
    listens again entries reach it, with one log_lines_dropped entry carrying the count."""
    read_fd, stream = pipe_stream
    clock = Clock()
    logsetup.configure("info", "auto", stream=stream, journal_socket=journal.path, clock=clock)
    assert logsetup.journal_in_use()
    journal.close()  # journald stops: its socket goes, and its end of our stdout
    os.close(read_fd)
    before = logsetup.dropped_lines()
    log.info("listening", address="127.0.0.1:7080")
    log.error("config_reload_failed", error="bad")
    assert logsetup.dropped_lines() == before + 2
    assert not logsetup.journal_in_use()

    restarted = FakeJournal(Path(journal.path))
    try:
        log.info("too_early")  # the socket is tried again after RETRY_S, not per entry
        assert not restarted.pending()
        clock.now += logsetup.RETRY_S
        log.info("listening", address="127.0.0.1:7081")
        log.info("later")
        assert logsetup.journal_in_use()
        received = [restarted.receive() for _ in range(3)]
        assert not restarted.pending()
    finally:
        restarted.close()
    assert [e["EPOLLD_EVENT"] for e in received] == ["listening", "log_lines_dropped", "later"]
    report = received[1]
    assert (report["PRIORITY"], report["EPOLLD_DROPPED"]) == ("4", "3")
    assert report["EPOLLD_ERROR"] == "Broken pipe"
    assert report["MESSAGE"].startswith("log_lines_dropped dropped=3")


# -- the daemon as a subprocess, journald stopped under it -----------------------------------

# The daemon's own /run, with tmp_path's journal directory where journald's socket would be:
# a private mount namespace (root, or an unprivileged user namespace) rather than a knob.
PRIVATE_RUN = (
    'mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/journal && mount --bind "$1" '
    "/run/systemd/journal && JOURNAL_STREAM=$(stat -L -c %d:%i /proc/$$/fd/1) && "
    'export JOURNAL_STREAM && shift && exec "$@"'
)
PROCESS_WAIT_S = 10.0


def epolld_command(config: Path) -> list[str]:
    return [sys.executable, "-m", "epolld", "--config", str(config)]


def unshare_prefix() -> list[str]:
    """unshare(1) for a private mount namespace, or skip where none can be made."""
    prefix = ["unshare", "--mount", "--propagation", "private"]
    if os.geteuid() != 0:
        prefix.append("--map-root-user")
    probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=PROCESS_WAIT_S)
    if probe.returncode != 0:
        pytest.skip("needs root or unprivileged user namespaces for a private /run")
    return prefix


def entries_until(journal: FakeJournal, event: str) -> list[dict[str, str]]:
    """Entries received until (and with) the first one of event, for PROCESS_WAIT_S at most."""
    received = []
    deadline = time.monotonic() + PROCESS_WAIT_S
    while time.monotonic() < deadline:
        received.append(journal.receive())
        if received[-1]["EPOLLD_EVENT"] == event:
            return received
    raise AssertionError(f"no {event} in {[e['EPOLLD_EVENT'] for e in received]}")


def echo_once(port: int, payload: bytes) -> None:
    """One client: send payload, read back exactly it, close."""
    with socket.create_connection(("127.0.0.1", port), timeout=PROCESS_WAIT_S) as client:
        client.sendall(payload)
        received = b""
        while len(received) < len(payload):
            chunk = client.recv(65536)
            assert chunk, "the daemon closed the connection"
            received += chunk
        assert received == payload


@pytest.mark.slow
def test_daemon_survives_journald_stopping_and_logs_again_when_it_is_back(
    tmp_path: Path,
) -> None:
    """With journald stopped under a running daemon (its socket gone, stdout a broken pipe),
    clients keep echoing byte-exact and the daemon stays up; when journald is back, entries
    reach it again, with one log_lines_dropped entry and the count in the stats; SIGTERM
    exits 0."""
    prefix = unshare_prefix()
    run_dir = tmp_path / "journal"
    run_dir.mkdir()
    config = tmp_path / "epolld.yaml"
    config.write_text('listen: ["127.0.0.1:0"]\nlogging: {level: debug}\n')
    journal = FakeJournal(run_dir / "socket")
    read_fd, write_fd = os.pipe()
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "NOTIFY_SOCKET")}
    proc = subprocess.Popen(
        [*prefix, "sh", "-c", PRIVATE_RUN, "sh", str(run_dir), *epolld_command(config)],
        stdout=write_fd,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    os.close(write_fd)
    restarted = None
    try:
        listening = entries_until(journal, "listening")[-1]
        port = int(listening["EPOLLD_ADDRESS"].rsplit(":", 1)[1])
        echo_once(port, b"before journald stops\n")

        journal.close()  # journald stops: its socket goes, and its end of every stdout
        os.close(read_fd)
        read_fd = -1
        payload = bytes(range(256)) * 64
        with socket.create_connection(("127.0.0.1", port), timeout=PROCESS_WAIT_S) as held:
            for i in range(20):  # each logs connection_opened and connection_closed
                echo_once(port, payload + str(i).encode())
            held.sendall(payload)
            assert recv_exactly_from(held, len(payload)) == payload
        os.kill(proc.pid, signal.SIGUSR1)  # a stats line, dropped too
        assert proc.poll() is None, f"the daemon exited with {proc.returncode}"

        restarted = FakeJournal(run_dir / "socket")  # journald is back
        time.sleep(journald.RETRY_S)  # the daemon tries its socket once a second at most
        echo_once(port, b"after journald is back\n")
        os.kill(proc.pid, signal.SIGUSR1)
        received = entries_until(restarted, "stats")
        names = [e["EPOLLD_EVENT"] for e in received]
        assert names.count("log_lines_dropped") == 1, names
        (report,) = [e for e in received if e["EPOLLD_EVENT"] == "log_lines_dropped"]
        dropped = int(report["EPOLLD_DROPPED"])
        assert dropped >= 40, "at least the 20 clients' opened and closed lines"
        assert report["PRIORITY"] == "4"
        assert int(received[-1]["EPOLLD_LOG_LINES_DROPPED"]) == dropped

        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(PROCESS_WAIT_S) == 0
        assert entries_until(restarted, "shutdown_complete")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(PROCESS_WAIT_S)
        if read_fd >= 0:
            os.close(read_fd)
        journal.close()
        if restarted is not None:
            restarted.close()


def recv_exactly_from(sock: socket.socket, n: int) -> bytes:
    """n bytes from sock (or fewer if it closes)."""
    data = b""
    while len(data) < n and (chunk := sock.recv(n - len(data))):
        data += chunk
    return data


# -- daemon.log_file on a full file system ----------------------------------------------------

LOG_FS_BYTES = 64 * 1024


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs mounted in tmp_path (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill up needs root")
    mount = tmp_path / "logs"
    mount.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={LOG_FS_BYTES},mode=0755", "tmpfs", str(mount)],
        check=True,
        timeout=PROCESS_WAIT_S,
    )
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False, timeout=PROCESS_WAIT_S)


def fill_fs(path: Path) -> None:
    """Write path until the file system it is on has no room left (ENOSPC)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        with contextlib.suppress(OSError):  # ENOSPC: full
            for _ in range(2 * LOG_FS_BYTES // 512):
                os.write(fd, b"f" * 512)
        with contextlib.suppress(OSError):  # down to the last bytes of a page
            while True:
                os.write(fd, b"f")
    finally:
        os.close(fd)


def pad_to_page(log_file: Path) -> None:
    """End the log file at a page boundary with a JSON line: once the file system is full,
    the daemon's next line needs a page there is no room for."""
    empty = '{"event": "pad", "x": ""}\n'
    room = -(log_file.stat().st_size + len(empty)) % 4096
    with open(log_file, "a") as f:
        f.write(empty.replace('""', '"' + "x" * room + '"'))
    assert log_file.stat().st_size % 4096 == 0


def wait_for_pid(pidfile: Path) -> int:
    deadline = time.monotonic() + PROCESS_WAIT_S
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError, ValueError):
            return int(pidfile.read_text())
        time.sleep(0.05)
    raise AssertionError(f"no pid in {pidfile}")


def logged(log_file: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in log_file.read_text().splitlines()]


def wait_logged(log_file: Path, event: str) -> list[dict[str, object]]:
    """The log file's events, once one named event is among them (PROCESS_WAIT_S at most)."""
    deadline = time.monotonic() + PROCESS_WAIT_S
    while time.monotonic() < deadline:
        events = logged(log_file)
        if any(e["event"] == event for e in events):
            return events
        time.sleep(0.05)
    raise AssertionError(f"no {event} in {log_file}")


@pytest.mark.slow
def test_full_log_file_system_drops_lines_and_resumes(tmp_path: Path, small_fs: Path) -> None:
    """With daemon.log_file on a full file system (ENOSPC), clients keep echoing and the
    daemon stays up; once space is freed, lines are written again, with one
    log_lines_dropped line carrying the count and the error."""
    log_file, pidfile = small_fs / "epolld.log", tmp_path / "epolld.pid"
    config = tmp_path / "epolld.yaml"
    config.write_text(
        'listen: ["127.0.0.1:0"]\nlogging: {level: debug, format: json}\n'
        f"daemon: {{log_file: {log_file}, pidfile: {pidfile}}}\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "LISTEN_FDS")}
    subprocess.run(
        [*epolld_command(config), "--daemon"], env=env, check=True, timeout=PROCESS_WAIT_S
    )
    pid = wait_for_pid(pidfile)
    try:
        listening = next(e for e in wait_logged(log_file, "listening") if "address" in e)
        port = int(str(listening["address"]).rsplit(":", 1)[1])
        filler = small_fs / "filler"
        pad_to_page(log_file)
        fill_fs(filler)
        size = log_file.stat().st_size
        for i in range(20):  # each logs connection_opened and connection_closed
            echo_once(port, bytes(range(256)) * 32 + str(i).encode())
        os.kill(pid, 0)  # still running
        assert log_file.stat().st_size == size, "the file system was full"

        filler.unlink()
        time.sleep(logsetup.RETRY_S)  # lines are tried again once a second at most
        echo_once(port, b"after space was freed\n")
        events = wait_logged(log_file, "log_lines_dropped")
        reports = [e for e in events if e["event"] == "log_lines_dropped"]
        assert len(reports) == 1
        assert int(str(reports[0]["dropped"])) >= 40, "the 20 clients' opened and closed"
        assert reports[0]["error"] == "No space left on device"
        assert reports[0]["level"] == "warning"
        os.kill(pid, signal.SIGTERM)
        wait_logged(log_file, "shutdown_complete")
    finally:
        with contextlib.suppress(ProcessLookupError):
            deadline = time.monotonic() + PROCESS_WAIT_S
            while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
                time.sleep(0.05)
            os.kill(pid, signal.SIGKILL)


def read_events_until(read_fd: int, event: str, count: int = 1) -> list[dict[str, object]]:
    """JSON lines from a pipe until count events named event have come (PROCESS_WAIT_S)."""
    events: list[dict[str, object]] = []
    buffered = b""
    deadline = time.monotonic() + PROCESS_WAIT_S
    poller = select.poll()
    poller.register(read_fd, select.POLLIN)
    while sum(e["event"] == event for e in events) < count:
        left = deadline - time.monotonic()
        assert left > 0, f"no {event} in {events}"
        assert poller.poll(left * 1000), f"no {event} in {events}"
        chunk = os.read(read_fd, 65536)
        assert chunk, f"stdout closed before {event}: {events}"
        *lines, buffered = (buffered + chunk).split(b"\n")
        events += [json.loads(line) for line in lines]
    return events


def scrape_dropped(port: int) -> float | None:
    """epolld_log_lines_dropped_total from the metrics endpoint (None if absent)."""
    with socket.create_connection(("127.0.0.1", port), timeout=PROCESS_WAIT_S) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        response = recv_until_closed(sock).decode()
    for line in response.splitlines():
        if line.startswith("epolld_log_lines_dropped_total "):
            return float(line.split()[1])
    return None


def recv_until_closed(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.slow
def test_workers_count_their_dropped_lines_in_the_supervisors_total(tmp_path: Path) -> None:
    """With workers and stdout a closed pipe, every worker keeps echoing, and the lines they
    could not write show in the supervisor's epolld_log_lines_dropped_total."""
    config = tmp_path / "epolld.yaml"
    config.write_text(
        'listen: ["127.0.0.1:0"]\nworkers: 2\nlogging: {level: debug, format: json}\n'
        'metrics: {listen: "127.0.0.1:0"}\n'
    )
    read_fd, write_fd = os.pipe()
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "NOTIFY_SOCKET")}
    proc = subprocess.Popen(
        epolld_command(config),
        stdout=write_fd,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    os.close(write_fd)
    try:
        events = read_events_until(read_fd, "listening", count=2)  # one per worker
        address = next(str(e["address"]) for e in events if e["event"] == "listening")
        port = int(address.rsplit(":", 1)[1])
        metrics = next(str(e["address"]) for e in events if e["event"] == "metrics_listening")
        metrics_port = int(metrics.rsplit(":", 1)[1])
        assert scrape_dropped(metrics_port) == 0
        os.close(read_fd)
        read_fd = -1
        for i in range(20):  # each logs connection_opened and connection_closed in a worker
            echo_once(port, b"through a worker %d\n" % i)
        deadline = time.monotonic() + PROCESS_WAIT_S
        while (dropped := scrape_dropped(metrics_port) or 0) < 40:  # heartbeats bring them
            assert time.monotonic() < deadline, f"only {dropped} dropped lines counted"
            time.sleep(0.1)
        assert proc.poll() is None
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(PROCESS_WAIT_S) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(PROCESS_WAIT_S)
        if read_fd >= 0:
            os.close(read_fd)


def test_exit_with_a_broken_stdout_is_not_status_120() -> None:
    """Output still buffered in sys.stdout when the process exits with stdout a closed pipe
    is dropped: the exit status stays the program's (Python's own final flush would make
    it 120)."""
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    code = "import sys; import epolld.observability.logsetup; sys.stdout.write('buffered')"
    try:
        done = subprocess.run(
            [sys.executable, "-c", code],
            stdout=write_fd,
            stderr=subprocess.PIPE,
            env=env,
            timeout=PROCESS_WAIT_S,
        )
    finally:
        os.close(write_fd)
    assert (done.returncode, done.stderr) == (0, b"")


def test_journald_that_does_not_read_cannot_hold_the_loop(
    journal: FakeJournal, journal_stream: TextIO
) -> None:
    """When journald's queue is full and it does not read, a send gives up after a bounded
    wait and the entry is written on stdout as a line; the logging calls return."""
    configure(journal_stream, journal)
    done = threading.Event()

    def log_until_full() -> None:
        for i in range(5000):  # net.unix.max_dgram_qlen: 10 to 512 queued entries
            log.info("filler", i=i)
            if lines(journal_stream):
                break
        done.set()

    writer = threading.Thread(target=log_until_full, daemon=True)
    writer.start()
    writer.join(RECV_TIMEOUT_S)
    assert done.is_set(), "a journald that does not read must not hold the logging call"
    (line,) = lines(journal_stream)
    assert line.startswith("<6>{")
    assert json.loads(line[3:])["event"] == "filler"
