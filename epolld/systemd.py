"""sd_notify through sdnotify: readiness, reload/stop states, STATUS, watchdog.

The contract the loop and cli rely on: every method is a silent no-op outside systemd
(NOTIFY_SOCKET unset) and never raises; a failed send is logged at debug level.

Why sdnotify is wrapped rather than called directly (sdnotify 0.3.1, Debian 12):

- It reads NOTIFY_SOCKET from os.environ in its constructor; we take the address from the
  environ we were given and connect a SOCK_DGRAM|SOCK_CLOEXEC socket ourselves.
- It connects once: after systemd re-creates its notify socket (daemon-reexec) every send fails.
  Like libsystemd's sd_notify(), we open, connect and close a socket per message (a few a
  second at most), so there is no stale connection and no descriptor held between messages.
- It swallows every error with a bare ``except``; with ``debug=True`` it re-raises, and we log
  the OSError at debug level instead of losing it.
- It encodes with Latin-1, so any text outside Latin-1 raises (and is swallowed) and Latin-1
  accents arrive as bytes systemd rejects as not UTF-8. We hand it text whose Latin-1 encoding
  *is* the UTF-8 encoding of our message, so systemd receives UTF-8 intact.
"""

from __future__ import annotations

import array
import os
import re
import select
import socket
import time
from collections.abc import Mapping

import sdnotify
import structlog

log = structlog.get_logger()

# Notification datagrams are read into a buffer of this size by systemd 252 (NOTIFY_BUFFER_MAX,
# which is PIPE_BUF): a longer message is truncated. STATUS is cut to stay well within it.
_STATUS_MAX_CHARS = 900  # at most 4 bytes each in UTF-8, doubled backslashes 2: < 4096
_CONTROL = "\x00-\x1f\x7f-\x9f"  # Unicode category Cc
_CONTROL_RUN = re.compile(f"[\\s{_CONTROL}]*[{_CONTROL}][\\s{_CONTROL}]*")
_SURROGATE = re.compile("[\ud800-\udfff]")


class _Sender(sdnotify.SystemdNotifier):  # type: ignore[misc]  # sdnotify has no type hints
    """sdnotify's notifier on a socket we connect, with errors raised to us (debug=True)."""

    def __init__(self, address: str) -> None:
        # Not calling super().__init__(): it reads os.environ and hides connect errors.
        self.debug = True
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self.socket.connect(address)
        except OSError:
            self.socket.close()
            raise

    def close(self) -> None:
        self.socket.close()


def _one_line(text: str) -> str:
    r"""Make text safe as the value of one sd_notify field, as systemd 252 parses it.

    - Control characters (newlines included) become one space with the blanks around them:
      a newline would start a new field (STATUS=x\nREADY=1 injects READY).
    - A backslash is doubled: systemd 252 splits the message with extract_first_word(), which
      drops a single backslash and lets one at a line's end swallow the next field.
    - A lone surrogate (from surrogateescape'd bytes) has no UTF-8 form: U+FFFD replaces it.
    """
    text = _CONTROL_RUN.sub(" ", text[:_STATUS_MAX_CHARS])
    text = _SURROGATE.sub("\ufffd", text)
    return text.replace("\\", "\\\\")


def _monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """Sends sd_notify(3) messages to the service manager named by NOTIFY_SOCKET.

    Args:
        environ: where NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID are read; os.environ
            when None.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = os.environ if environ is None else environ

    @property
    def enabled(self) -> bool:
        """True when a service manager asked for notifications (NOTIFY_SOCKET is set)."""
        return bool(self._environ.get("NOTIFY_SOCKET"))

    def ready(self, status: str) -> None:
        """READY=1 with STATUS=status: every listener is bound, the loop is about to run."""
        self._send("READY=1", f"STATUS={_one_line(status)}")

    def reloading(self) -> None:
        """RELOADING=1 with MONOTONIC_USEC, at the start of a SIGHUP reload."""
        self._send("RELOADING=1", f"MONOTONIC_USEC={_monotonic_usec()}", "STATUS=reloading")

    def stopping(self, status: str) -> None:
        """STOPPING=1 with STATUS=status, at the start of a graceful stop."""
        self._send("STOPPING=1", f"STATUS={_one_line(status)}")

    def status(self, text: str) -> None:
        """STATUS=text (one line: control characters are escaped)."""
        self._send(f"STATUS={_one_line(text)}")

    def extend_timeout(self, seconds: float) -> None:
        """EXTEND_TIMEOUT_USEC: a drain needs this much longer than systemd's stop timeout."""
        self._send(f"EXTEND_TIMEOUT_USEC={max(0, round(seconds * 1_000_000))}")

    def fatal(self, status: str, errno: int | None = None) -> None:
        """STATUS= (and ERRNO=) before exiting on a start-up error."""
        fields = [f"STATUS={_one_line(status)}"]
        if errno is not None:
            fields.append(f"ERRNO={errno}")
        self._send(*fields)

    def watchdog_interval_s(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None when not asked.

        None too when WATCHDOG_PID names another process: the watchdog is then not ours
        (sd_watchdog_enabled(3)).
        """
        if not self.enabled:
            return None
        try:
            usec = int(self._environ.get("WATCHDOG_USEC", ""))
        except ValueError:
            return None
        if usec <= 0:
            return None
        pid = self._environ.get("WATCHDOG_PID")
        if pid and pid != str(os.getpid()):
            return None
        return usec / 2 / 1_000_000

    def watchdog_ping(self) -> None:
        """WATCHDOG=1, only when the watchdog is ours (see watchdog_interval_s)."""
        if self.watchdog_interval_s() is not None:
            self._send("WATCHDOG=1")

    # -- the file descriptor store (restart handoff; epolld/handoff.py) ----------------

    def store_fd(self, name: str, fd: int) -> None:
        """FDSTORE=1 with FDNAME=name: systemd keeps fd and passes it to the next process
        as LISTEN_FDS (one name per message, so one message per descriptor).

        Raises:
            OSError: the message could not be sent (this one must not fail silently).
        """
        self._sendmsg(f"FDSTORE=1\nFDNAME={name}", [fd])

    def remove_fd(self, name: str) -> None:
        """FDSTOREREMOVE=1 with FDNAME=name: systemd closes its copies of that name (else a
        descriptor we consumed would be passed again at the next restart)."""
        try:
            self._sendmsg(f"FDSTOREREMOVE=1\nFDNAME={name}", [])
        except OSError as e:
            self._log_failure(f"FDSTOREREMOVE {name}", e)

    def barrier(self, timeout_s: float) -> bool:
        """BARRIER=1 (sd_notify_barrier(3)): True once systemd has processed every message
        sent before, i.e. it closed its copy of our pipe's write end; False on timeout.

        Raises:
            OSError: the message could not be sent.
        """
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            try:
                self._sendmsg("BARRIER=1", [w])
            finally:
                os.close(w)
            poller = select.poll()
            poller.register(r, 0)  # POLLHUP is always reported
            return bool(poller.poll(max(0, round(timeout_s * 1000))))
        finally:
            os.close(r)

    def _sendmsg(self, message: str, fds: list[int]) -> None:
        """One datagram with SCM_RIGHTS. socket.send_fds() ignores its address on 3.11
        (ENOTCONN), hence sendmsg with the address."""
        address = self._environ.get("NOTIFY_SOCKET")
        if not address:
            raise OSError(f"NOTIFY_SOCKET is not set: cannot send {message.splitlines()[0]}")
        if address[0] == "@":
            address = "\0" + address[1:]
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendmsg([message.encode("utf-8")], rights, 0, address)

    def _send(self, *fields: str) -> None:
        address = self._environ.get("NOTIFY_SOCKET")
        if not address:
            return
        if address[0] == "@":  # abstract namespace (sd_notify(3))
            address = "\0" + address[1:]
        message = "\n".join(fields)
        # sdnotify encodes with Latin-1: this string's Latin-1 bytes are the message's UTF-8.
        smuggled = message.encode("utf-8").decode("latin-1")
        try:
            sender = _Sender(address)
        except OSError as e:
            self._log_failure(message, e)
            return
        try:
            sender.notify(smuggled)
        except OSError as e:
            self._log_failure(message, e)
        finally:
            sender.close()

    def _log_failure(self, message: str, error: OSError) -> None:
        # Debug only: nobody can act on it at run time, but a test or an operator chasing
        # "why is my unit stuck in activating" can turn it on.
        log.debug(
            "sd_notify_failed",
            socket=self._environ.get("NOTIFY_SOCKET"),
            message=message,
            error=str(error),
        )
