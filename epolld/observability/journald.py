"""The journald sink: structured entries over journald's native protocol.

When stdout is the journal (systemd sets JOURNAL_STREAM to the stream's "device:inode";
systemd.exec(5)), each log event becomes one journal entry sent as one datagram to
/run/systemd/journal/socket, as systemd's "Native Journal Protocol" document describes:

- MESSAGE is a short human sentence (what `journalctl -u epolld -f` shows), PRIORITY the
  syslog(3) level, SYSLOG_IDENTIFIER=epolld, and every structured field is a journal field
  of its own (EPOLLD_EVENT=connection_closed, EPOLLD_PEER=...), so that `journalctl
  EPOLLD_EVENT=config_reload_failed` filters and `-o json` carries each one.
- A value holding a newline (a traceback, a multi-line error) is sent in the length-prefixed
  form, so a traceback stays one entry; an entry too large for a datagram (EMSGSIZE) goes in
  a sealed memfd passed with SCM_RIGHTS, as sd_journal_sendv() does.
- Written here rather than with python3-systemd: that is a C extension (Debian 12 ships 235)
  which a venv would have to build against libsystemd-dev, for about a hundred lines of
  documented, stable protocol.

An entry the socket does not take (journald stopped, or not listening yet) is written on
stdout instead as a line with a "<N>" priority prefix (SyslogLevelPrefix=, sd-daemon(3)),
which logsetup writes or drops and counts (with journald stopped, stdout is a broken pipe
too). The socket is then tried again at most once every RETRY_S, not per entry, and entries
go to it again as soon as journald is back. A redirected stdout (a terminal, a file, a
child whose stdout was redirected) is not the journal and gets neither.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import json
import os
import re
import socket
import stat
import struct
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

SOCKET_PATH = "/run/systemd/journal/socket"
IDENTIFIER = "epolld"
FIELD_PREFIX = "EPOLLD_"
FIELD_NAME_MAX = 64  # journald drops fields with longer names (journal_field_valid())
# sd-journal asks for 8 MiB so that a burst of entries does not block; the kernel caps it
# at net.core.wmem_max (and doubles it). Larger entries go through a memfd.
SEND_BUFFER_BYTES = 8 * 1024 * 1024
# A journald that does not read (hung, stopped by a signal) holds a send this long at most
# (SO_SNDTIMEO), then the entry is written as a line; and RETRY_S passes before the socket
# is tried again: the loop waits at most WAIT_S in every RETRY_S for it.
WAIT_S = 0.1
RETRY_S = 1.0
READABLE_VALUE_MAX = 200  # characters of a value in a default MESSAGE
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL

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

# MESSAGE for the events an operator reads most; any other event reads "name key=value ...".
# A template whose fields are missing from the event falls back to that default too.
_MESSAGES = {
    "listening": "listening on {address}",
    "socket_inherited": "socket inherited from systemd: {address}",
    "listener_closed": "listener closed: {address}",
    "connection_opened": "connection opened: {peer} on {listener}",
    "connection_closed": "connection closed: {peer}, {bytes_in} bytes in, {bytes_out} out, "
    "{reason}",
    "connection_refused": "connection refused: over {limit} ({value}), {refused} refused",
    "proxy_header_refused": "PROXY header refused from {proxy} ({reason}), {refused} refused",
    "accept_failed": "accept failed on {address}",
    "accept_paused": "accepting paused on {address} for {retry_s} s",
    "accept_resumed": "accepting resumed after {paused_s} s",
    "splice_unavailable": "splice unavailable ({reason}): copying instead",
    "splice_available": "splice available again",
    "config_reloaded": "configuration reloaded",
    "config_reload_failed": "configuration reload failed, the old one stays in force",
    "listen_ignored": "listen ignored: {reason}",
    "shutdown_started": "shutting down on {signal}: draining {connections} connections",
    "shutdown_forced": "shutdown forced ({reason}): closing {connections} connections",
    "shutdown_complete": "shutdown complete: {accepted} accepted, {bytes_in} bytes in",
    "stats": "stats: {connections} open, {accepted} accepted, {bytes_in} bytes in, {bytes_out} out",
    "loop_crashed": "event loop crashed",
    "handler_bug": "internal error, closing {handler}",
    "handoff_started": "handing over {connections} connections and {listeners} listeners ({route})",
    "handoff_complete": "took over {connections} connections from PID {old_pid} "
    "({old_version} -> {new_version}) in {duration_s} s",
    "handoff_failed": "handoff failed ({reason}): {action}",
    "config_invalid": "configuration invalid, {action}: {error}",
}
# Not fields of their own: PRIORITY carries the level, journald stamps every entry itself,
# and the traceback gets a name that says what it is.
_NOT_FIELDS = frozenset({"event", "level", "timestamp", "exception"})
_INVALID_NAME_CHARS = re.compile("[^A-Z0-9_]")


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


# -- the entry -------------------------------------------------------------------------


def field_name(key: str) -> str:
    """The journal field for a structured key: "bytes_in" -> "EPOLLD_BYTES_IN".

    journald accepts only A-Z, 0-9 and "_" and no leading "_" (trusted fields) or digit;
    the prefix takes care of the first character, anything else becomes "_".
    """
    return (FIELD_PREFIX + _INVALID_NAME_CHARS.sub("_", key.upper()))[:FIELD_NAME_MAX]


def field_value(value: Any) -> str:
    """A value as journal text: strings as they are, anything else as JSON (true, 6, [..])."""
    if isinstance(value, str):
        return value
    return json.dumps(value, default=str, ensure_ascii=False, separators=(",", ":"))


def message(event_dict: Mapping[str, Any]) -> str:
    """The MESSAGE of an event: a short sentence, then the traceback if there is one.

    An event with an "error" its sentence does not already name gets ": <error>" appended.
    """
    event = str(event_dict.get("event", ""))
    text = _sentence(event, event_dict)
    if text is None:
        pairs = " ".join(
            f"{k}={_readable(v)}"
            for k, v in event_dict.items()
            if k not in _NOT_FIELDS and v is not None
        )
        text = f"{event} {pairs}" if pairs else event
    traceback = event_dict.get("exception")
    if traceback:
        text += "\n" + str(traceback).rstrip("\n")
    return text


def _sentence(event: str, event_dict: Mapping[str, Any]) -> str | None:
    """The event's template filled in, or None without one (or without a field it names)."""
    template = _MESSAGES.get(event)
    if template is None:
        return None
    try:
        text = template.format_map(event_dict)
    except (KeyError, IndexError, ValueError):
        return None
    error = event_dict.get("error")
    if error is not None and "{error}" not in template:
        text += f": {error}"
    return text


def _readable(value: Any) -> str:
    """A value for "key=value" in a default MESSAGE: quoted if it needs it, and cut short (its
    field has all of it)."""
    text = field_value(value)
    if len(text) > READABLE_VALUE_MAX:
        text = text[: READABLE_VALUE_MAX - 1] + "…"
    if isinstance(value, str) and (not text or any(c in text for c in " \"'=\n")):
        return json.dumps(value, ensure_ascii=False)
    return text


def entry_fields(event_dict: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The journal fields of one event, in the order they are sent.

    A field whose value is None is left out: an absent field is the journal's null.
    """
    level = str(event_dict.get("level", "info"))
    fields = [
        ("MESSAGE", message(event_dict)),
        ("PRIORITY", str(_PRIORITIES.get(level.lower(), 6))),
        ("SYSLOG_IDENTIFIER", IDENTIFIER),
        ("EPOLLD_EVENT", str(event_dict.get("event", ""))),
    ]
    for key, value in event_dict.items():
        if key not in _NOT_FIELDS and value is not None:
            fields.append((field_name(key), field_value(value)))
    traceback = event_dict.get("exception")
    if traceback:
        fields.append(("EPOLLD_TRACEBACK", str(traceback)))
    return fields


def encode_entry(fields: Iterable[tuple[str, str | bytes]]) -> bytes:
    """Serialize fields as one native-protocol entry.

    "NAME=value\\n" when the value has no newline; otherwise "NAME\\n", the value's length as a
    little-endian 64-bit integer, the value and "\\n" (the protocol's binary-safe form).
    """
    parts: list[bytes] = []
    for name, value in fields:
        data = value.encode("utf-8", "replace") if isinstance(value, str) else value
        key = name.encode("ascii")
        if b"\n" in data:
            parts += (key, b"\n", len(data).to_bytes(8, "little"), data, b"\n")
        else:
            parts += (key, b"=", data, b"\n")
    return b"".join(parts)


# -- the socket ------------------------------------------------------------------------


class JournalSocket:
    """An AF_UNIX datagram socket to journald; each send() is one entry.

    Unconnected, with the address on every send: a restarted journald binds a new socket at
    the same path, which a connected socket would never reach again. Blocking, as
    sd_journal_sendv() is, since net.unix.max_dgram_qlen is often 10 and a non-blocking send
    would fail in any burst; but for WAIT_S at most (SO_SNDTIMEO), so that a journald that
    does not read cannot hold the loop.
    """

    def __init__(self, path: str = SOCKET_PATH) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        # Refused or capped: the default buffer works too, larger entries use a memfd.
        with contextlib.suppress(OSError):
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        # struct timeval; the socket stays blocking for Python (a timeout would poll, which
        # an unconnected datagram socket answers at once however full journald's queue is).
        timeout = struct.pack("@ll", 0, round(WAIT_S * 1_000_000))
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeout)
        st = os.fstat(self._sock.fileno())
        self._identity = (st.st_dev, st.st_ino)

    @property
    def send_buffer_bytes(self) -> int:
        """SO_SNDBUF as the kernel granted it: a larger entry is sent in a memfd."""
        return int(self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))

    @staticmethod
    def reachable(path: str) -> bool:
        """Whether journald listens at path.

        Probes with connect() on a throwaway socket, which fails at once (ENOENT,
        ECONNREFUSED, EACCES) without writing an entry.
        """
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as probe:
                probe.connect(path)
            return True
        except OSError:
            return False

    def send(self, payload: bytes) -> bool:
        """Send one entry; False if journald could not be reached (the caller keeps it)."""
        try:
            self._sock.sendto(payload, self.path)
            return True
        except OSError as e:
            if e.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                return False
        return self._send_memfd(payload)

    def _send_memfd(self, payload: bytes) -> bool:
        """An entry too large for a datagram: an empty datagram carrying a sealed memfd.

        journald maps only a memfd sealed against writing, growing and shrinking.
        """
        try:
            fd = os.memfd_create("epolld-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except OSError:
            return False
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
            self._sock.sendmsg([], rights, 0, self.path)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)

    def close(self) -> None:
        """Close the socket, unless its descriptor now belongs to something else.

        python-daemon closes every descriptor it was not told to keep, and the number can be
        reused before the next configure(): closing it then would close someone else's file.
        """
        try:
            st = os.fstat(self._sock.fileno())
            ours = stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == self._identity
        except OSError:
            ours = False
        if ours:
            self._sock.close()
        else:
            self._sock.detach()


class JournalLogger:
    """A structlog logger whose events are journal entries.

    The final processor hands over the event dict (see to_journal()); an entry that the
    socket does not take is written as a line, fallback(event_dict), instead. After such a
    failure the socket is left alone for RETRY_S: one failed send a second at most, not one
    per entry, while journald is away.

    Args:
        journal: where entries go.
        write_line: writes a fallback line (stdout); never raises.
        fallback: renders an event as one line (without the newline).
        on_sent: called after each entry the journal took.
        clock: monotonic seconds (tests pass their own).
    """

    def __init__(
        self,
        journal: JournalSocket,
        write_line: Callable[[str], None],
        fallback: Callable[[dict[str, Any]], str],
        on_sent: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.journal = journal
        self._write_line = write_line
        self._fallback = fallback
        self._on_sent = on_sent
        self._clock = clock
        self._retry_at = 0.0
        self.journal_up = JournalSocket.reachable(journal.path)

    def msg(self, event_dict: dict[str, Any]) -> None:
        """Send one event as one entry, or write it as a line if the journal is away."""
        now = self._clock()
        if now >= self._retry_at:
            self.journal_up = self.journal.send(encode_entry(entry_fields(event_dict)))
            if self.journal_up:
                self._on_sent()
                return
            self._retry_at = now + RETRY_S
        self._write_line(self._fallback(event_dict))

    debug = info = warning = warn = error = critical = fatal = exception = msg


def to_journal(logger: Any, method_name: str, event_dict: Any) -> Any:
    """structlog's final processor for JournalLogger: pass the event dict on as it is."""
    return (event_dict,), {}
