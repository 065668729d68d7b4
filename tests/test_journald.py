"""journald support: JOURNAL_STREAM detection on real descriptors, and priority prefixes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from epolld.journald import priority_prefix, stdout_is_journal

REPORT = "from epolld.journald import stdout_is_journal; print(stdout_is_journal())"


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
