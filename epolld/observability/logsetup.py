"""The one structlog configuration: journal entries, JSON lines, or console on a TTY.

With format "auto": native journal entries when stdout is the journal and its socket takes
them (journald.py), else a console on a terminal, else JSON lines (files, pipes, and the
journal stream when its socket cannot be used, with "<N>" priorities).

Logging never takes the daemon down nor holds its loop (issue 20): stdout may be a pipe or
the journal stream that is full or broken (journald stopped), a log file may hit ENOSPC or
EIO. A line that cannot be written within WAIT_S is dropped and counted (dropped_lines(),
in the stats and the metrics), and so is every line for RETRY_S after: no retry per line.
When output works again, one "log_lines_dropped" warning says how many were lost and why.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import logging
import os
import select
import stat
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import structlog

from epolld.observability import journald

# structlog 22.3 (Debian 12) has no trace level: "trace" filters like debug and
# additionally turns on the loop's per-batch epoll trace.
LEVELS = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
FORMATS = ("auto", "json", "console")

# A full pipe or socket gets this long for room before the line is dropped: a reader that is
# merely slow catches up, a stuck one costs the loop at most this per RETRY_S.
WAIT_S = journald.WAIT_S
RETRY_S = journald.RETRY_S  # after a failure, lines are dropped unwritten for this long
PIPE_BUF = select.PIPE_BUF  # bytes: what POLLOUT promises room for on a pipe

_min_level = logging.INFO
_journal: journald.JournalSocket | None = None  # the one in use, closed on reconfiguring
_sink: journald.JournalLogger | None = None
_dropped_total = 0  # log lines lost since start
_unreported = 0  # of which not yet reported by a log_lines_dropped warning
_drop_error: str | None = None  # the first error since the last report
_reporting = False


def configure(
    level: str = "info",
    fmt: str = "auto",
    stream: TextIO | None = None,
    journal_socket: str = journald.SOCKET_PATH,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Configure structlog for the whole process; called again on reload.

    Args:
        level: one of LEVELS.
        fmt: "json", "console", or "auto" (journal entries when stream is the journal,
            console on a terminal, JSON otherwise).
        stream: where lines go; sys.stdout (as it is at call time) by default.
        journal_socket: journald's native socket (tests point it elsewhere).
        clock: monotonic seconds, for WAIT_S and RETRY_S (tests pass their own).
    """
    global _min_level, _journal, _sink
    stream = sys.stdout if stream is None else stream
    with contextlib.suppress(OSError, ValueError):  # left for exit (_flush_at_exit) if it fails
        stream.flush()  # lines are written to its descriptor from now on, unbuffered
    on_journal = _is_journal(stream)
    journal = None
    if fmt == "auto" and on_journal:
        # Kept across reloads: loggers bound before one may still hold it.
        if _journal is not None and _journal.path == journal_socket:
            journal, _journal = _journal, None
        else:
            # Even when nothing listens now (journald stopped): it is tried again later.
            journal = journald.JournalSocket(journal_socket)
    if _journal is not None:
        _journal.close()
    _journal = journal
    _sink = None
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    processors: list[Any] = [
        # A worker process binds worker=N here (supervisor.py); nothing otherwise.
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # One write() per line (print() makes two when unbuffered): worker processes share
    # stdout, and a line written in one piece of at most PIPE_BUF bytes is never torn.
    writer = LineWriter(stream, clock)
    logger: Any = LineLogger(writer)
    if _journal is not None:
        processors += [structlog.processors.format_exc_info, journald.to_journal]
        _sink = logger = journald.JournalLogger(
            _journal, writer.write, _fallback_line, on_sent=_output_works, clock=clock
        )
    elif fmt == "console":
        processors.append(structlog.dev.ConsoleRenderer(colors=stream.isatty()))
    else:
        # A traceback becomes one escaped string: the whole entry stays one journal line.
        processors += [
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=False),
        ]
        if on_journal:
            processors.append(_add_priority)
    _min_level = LEVELS[level]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_min_level),
        logger_factory=lambda *names: logger,  # one sink for every logger name
        # Not cached: a reload that changes the level must reach every logger.
        cache_logger_on_first_use=False,
    )


def enabled(level: str) -> bool:
    """Whether a log call at level would be emitted; check once, not per event."""
    return LEVELS[level] >= _min_level


def journal_in_use() -> bool:
    """Whether events go to journald as native entries (rather than as lines)."""
    return _sink is not None and _sink.journal_up


def dropped_lines() -> int:
    """Log lines this process could not write anywhere, since it started."""
    return _dropped_total


class LineWriter:
    """Writes log lines to a stream's descriptor; never raises, waits at most WAIT_S.

    Each line goes out in one write() when the descriptor has room for it: poll() reports a
    pipe writable when a PIPE_BUF-sized write fits, and a socket when a quarter of its buffer
    is free. A line that finds no room within WAIT_S, or whose write fails (EPIPE, ENOSPC,
    EIO), is dropped; so is every line for RETRY_S after, unwritten. A line cut short by
    that (one longer than the room there was) is finished before the next one.

    Args:
        stream: where lines go (its descriptor when it has one, else its write()).
        clock: monotonic seconds (tests pass their own).
    """

    def __init__(self, stream: TextIO, clock: Callable[[], float] = time.monotonic) -> None:
        self._stream = stream
        self._clock = clock
        self._fd: int | None
        try:
            self._fd = stream.fileno()
        except (AttributeError, OSError, ValueError):  # io.StringIO: write() it is
            self._fd = None
        self._poll = select.poll()
        if self._fd is not None:
            self._poll.register(self._fd, select.POLLOUT)
        self._tail = b""  # the rest of a line cut short
        # poll() promises room for PIPE_BUF bytes on a pipe or socket; a file or a terminal
        # takes a line in one write(), whole among the workers' lines.
        self._piece = PIPE_BUF if self._fd is not None and _is_pipe(self._fd) else None
        self._retry_at = 0.0

    def write(self, line: str) -> None:
        """Write line and a newline, or count it as dropped."""
        now = self._clock()
        if now < self._retry_at:
            _count_drop(None)
            return
        try:
            if self._fd is None:
                self._stream.write(line + "\n")
                self._stream.flush()
            else:
                self._write_fd(self._tail + (line + "\n").encode("utf-8", "replace"), now)
        except (OSError, ValueError) as e:  # ValueError: the stream was closed
            self._retry_at = now + RETRY_S
            _count_drop(_describe(e))
            return
        _output_works()

    def _write_fd(self, data: bytes, now: float) -> None:
        """Write data in pieces the descriptor has room for, until WAIT_S is up. Once part
        of it is out, the rest is kept to go first next time, rather than torn off.

        Raises:
            OSError: nothing could be written (BlockingIOError: no room came in time).
        """
        assert self._fd is not None
        deadline = now + WAIT_S
        view = memoryview(data)
        try:
            while view:
                wait_ms = max(0, round((deadline - self._clock()) * 1000))
                if not self._poll.poll(wait_ms):
                    raise BlockingIOError(errno.EAGAIN, f"no room within {WAIT_S} s")
                view = view[os.write(self._fd, view[: self._piece]) :]
        except OSError:
            if len(view) == len(data):
                raise
        self._tail = bytes(view)


class LineLogger:
    """structlog's logger for rendered lines (JSON, console): one line per event."""

    def __init__(self, writer: LineWriter) -> None:
        self._writer = writer

    def msg(self, message: str) -> None:
        self._writer.write(message)

    debug = info = warning = warn = error = critical = fatal = exception = log = msg


def _count_drop(error: str | None) -> None:
    """Count a line that could not be written; the first error is kept for the report."""
    global _dropped_total, _unreported, _drop_error
    _dropped_total += 1
    _unreported += 1
    if _drop_error is None:
        _drop_error = error


def _output_works() -> None:
    """Something was written: report the lines lost before, once."""
    global _unreported, _drop_error, _reporting
    if not _unreported or _reporting:
        return
    dropped, error = _unreported, _drop_error
    _unreported, _drop_error, _reporting = 0, None, True
    try:
        structlog.get_logger("epolld").warning(
            "log_lines_dropped", dropped=dropped, dropped_total=_dropped_total, error=error
        )
    finally:
        _reporting = False


def _forget_drops() -> None:
    """In a forked child (a worker): the parent's drops are the parent's to count and
    report; the supervisor adds both."""
    global _dropped_total, _unreported, _drop_error
    _dropped_total, _unreported, _drop_error = 0, 0, None


os.register_at_fork(after_in_child=_forget_drops)


def _is_pipe(fd: int) -> bool:
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def _describe(e: Exception) -> str:
    return e.strerror if isinstance(e, OSError) and e.strerror else str(e)


@atexit.register
def _flush_at_exit() -> None:
    """Flush stdout and stderr before Python does; drop what they buffered if that fails.

    Python flushes sys.stdout at exit and exits with status 120 if that fails (a closed
    pipe, journald stopped): the stream is pointed at /dev/null instead, as the Python
    documentation's note on SIGPIPE suggests, and what it held is dropped.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            with contextlib.suppress(OSError, ValueError, AttributeError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, stream.fileno())
                os.close(devnull)
                stream.flush()


def _is_journal(stream: TextIO) -> bool:
    """Whether stream is the journal stream systemd named in JOURNAL_STREAM."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.StringIO, a closed file
        return False
    return journald.stdout_is_journal(fd=fd)


def _add_priority(logger: Any, name: str, line: str) -> str:
    """Prefix a line with its syslog priority "<N>", which journald reads from its stream."""
    return journald.priority_prefix(name) + line


_render_json = structlog.processors.JSONRenderer(sort_keys=False)


def _fallback_line(event_dict: dict[str, Any]) -> str:
    """An event journald's socket did not take, as the "<N>"-prefixed JSON line it would
    have been without the socket: it still reaches the journal, through stdout."""
    line = str(_render_json(None, "", dict(event_dict)))
    return journald.priority_prefix(str(event_dict.get("level", ""))) + line
