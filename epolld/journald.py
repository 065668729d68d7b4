"""journald stream support: detect that stdout is the journal, and syslog priority prefixes.

journald reads a leading ``<N>`` on each stdout line as the entry's syslog priority
(SyslogLevelPrefix=, on by default; sd-daemon(3)), so ``journalctl -p warning`` filters
epolld's JSON lines. The prefix is only added when stdout really is the journal stream:
systemd sets JOURNAL_STREAM to the stream's "device:inode", and anything else (a terminal, a
pipe to a file, a child whose stdout was redirected) must not get stray ``<6>`` prefixes
(systemd.exec(5), JOURNAL_STREAM).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

# syslog(3) priorities for structlog's level names. "trace" (below debug) has no syslog level
# of its own: debug is the lowest there is.
_PRIORITIES = {
    "trace": 7,
    "debug": 7,  # LOG_DEBUG
    "info": 6,  # LOG_INFO
    "notice": 5,  # LOG_NOTICE
    "warning": 4,  # LOG_WARNING
    "warn": 4,
    "error": 3,  # LOG_ERR
    "exception": 3,  # structlog's log.exception() logs at error
    "critical": 2,  # LOG_CRIT
    "fatal": 2,
}


def stdout_is_journal(environ: Mapping[str, str] | None = None, fd: int = 1) -> bool:
    """True when fd (stdout) is the journal stream named by JOURNAL_STREAM.

    Args:
        environ: where JOURNAL_STREAM is read; os.environ when None.
        fd: the descriptor to compare, stdout unless told.
    """
    environ = os.environ if environ is None else environ
    device, sep, inode = environ.get("JOURNAL_STREAM", "").partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (OSError, ValueError):  # stdout closed, or a malformed JOURNAL_STREAM
        return False


def priority_prefix(level: str) -> str:
    """The "<N>" syslog priority prefix for a structlog level name, e.g. "warning" -> "<4>".

    Case-insensitive. An unknown level gets no prefix, so journald applies the stream's
    default priority (info for stdout).
    """
    priority = _PRIORITIES.get(level.lower())
    return "" if priority is None else f"<{priority}>"
