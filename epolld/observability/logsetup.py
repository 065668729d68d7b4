"""The one structlog configuration: journal entries, JSON lines, or console on a TTY.

With format "auto": native journal entries when stdout is the journal and its socket takes
them (journald.py), else a console on a terminal, else JSON lines (files, pipes, and the
journal stream when its socket cannot be used, with "<N>" priorities).
"""

from __future__ import annotations

import logging
import sys
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

_min_level = logging.INFO
_journal: journald.JournalSocket | None = None  # the one in use, closed on reconfiguring


def configure(
    level: str = "info",
    fmt: str = "auto",
    stream: TextIO | None = None,
    journal_socket: str = journald.SOCKET_PATH,
) -> None:
    """Configure structlog for the whole process; called again on reload.

    Args:
        level: one of LEVELS.
        fmt: "json", "console", or "auto" (journal entries when stream is the journal,
            console on a terminal, JSON otherwise).
        stream: where lines go; sys.stdout (as it is at call time) by default.
        journal_socket: journald's native socket (tests point it elsewhere).
    """
    global _min_level, _journal
    stream = sys.stdout if stream is None else stream
    on_journal = _is_journal(stream)
    journal = None
    if fmt == "auto" and on_journal:
        # Kept across reloads: loggers bound before one may still hold it.
        if _journal is not None and _journal.path == journal_socket:
            journal, _journal = _journal, None
        else:
            journal = journald.JournalSocket.open(journal_socket)
    if _journal is not None:
        _journal.close()
    _journal = journal
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
    logger_factory: Any = structlog.WriteLoggerFactory(stream)
    if _journal is not None:
        processors += [structlog.processors.format_exc_info, journald.to_journal]
        logger = journald.JournalLogger(_journal, stream, _fallback_line)
        logger_factory = lambda *names: logger  # noqa: E731 (one sink for every logger name)
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
        logger_factory=logger_factory,
        # Not cached: a reload that changes the level must reach every logger.
        cache_logger_on_first_use=False,
    )


def enabled(level: str) -> bool:
    """Whether a log call at level would be emitted; check once, not per event."""
    return LEVELS[level] >= _min_level


def journal_in_use() -> bool:
    """Whether events go to journald as native entries (rather than as lines)."""
    return _journal is not None


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
