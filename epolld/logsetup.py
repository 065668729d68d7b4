"""The one structlog configuration: JSON lines for journald and files, console on a TTY."""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

from epolld import journald

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


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Configure structlog for the whole process; called again on reload.

    Args:
        level: one of LEVELS.
        fmt: "json", "console", or "auto" (console on a terminal, JSON otherwise).
        stream: where lines go; sys.stdout (as it is at call time) by default.
    """
    global _min_level
    stream = sys.stdout if stream is None else stream
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    processors: list[Any] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt == "console":
        processors.append(structlog.dev.ConsoleRenderer(colors=stream.isatty()))
    else:
        # A traceback becomes one escaped string: the whole entry stays one journal line.
        processors += [
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=False),
        ]
        prefix = _journal_prefixer(stream)
        if prefix is not None:
            processors.append(prefix)
    _min_level = LEVELS[level]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_min_level),
        logger_factory=structlog.PrintLoggerFactory(stream),
        # Not cached: a reload that changes the level must reach every logger.
        cache_logger_on_first_use=False,
    )


def enabled(level: str) -> bool:
    """Whether a log call at level would be emitted; check once, not per event."""
    return LEVELS[level] >= _min_level


def _journal_prefixer(stream: TextIO) -> Any:
    """When stream is the journal, prefix each line with its syslog priority "<N>"."""
    if stream is not sys.stdout or not journald.stdout_is_journal():
        return None

    def add_priority(logger: Any, name: str, line: str) -> str:
        return journald.priority_prefix(name) + line

    return add_priority
