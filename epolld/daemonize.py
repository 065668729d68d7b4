"""Classic daemon mode with python-daemon, for hosts without systemd.

The CLI validates the config and binds its listeners first, so that mistakes still reach
the terminal, and only then enters daemon_context(). python-daemon 2.3.2 (Debian 12)
does the rest: fork twice with setsid, chdir /, close every fd not preserved and point
stdin/stdout/stderr elsewhere. The pidfile is epolld's own (epolld/pidfile.py: locked, so
that a stale one is told from a live one by the lock, not by a PID that may be reused);
a live one is reported before forking. The log file is reopened on request (SIGHUP), for
logrotate.

Never use this under systemd: it would close socket-activation fds and the journal
stream, and systemd would lose track of the main PID.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import IO

import daemon
import structlog

from epolld.errors import DaemonError
from epolld.pidfile import PidFile

log = structlog.get_logger("epolld")

# python-daemon's default umask is 0, which would make the files the daemon creates
# (the pidfile, a Unix socket) writable by everyone.
UMASK = 0o022

# python-daemon's default signal map turns SIGTERM into SystemExit at any point of the
# loop. Keep only its job-control defaults (ignored); the loop installs its own SIGTERM
# and SIGHUP handlers after the context is open.
_SIGNAL_MAP: dict[int, None] = {
    signal.SIGTSTP: None,
    signal.SIGTTIN: None,
    signal.SIGTTOU: None,
}

# Variables that mean systemd started us: daemonizing would close what they point at.
_SYSTEMD_VARIABLES = {
    "NOTIFY_SOCKET": "use Type=notify and run epolld in the foreground",
    "LISTEN_FDS": "socket activation passes sockets that daemonizing would close",
}


def refuse_under_systemd(environ: Mapping[str, str]) -> None:
    """Refuse classic daemon mode when systemd started the process.

    Args:
        environ: the process environment.

    Raises:
        DaemonError: NOTIFY_SOCKET or LISTEN_FDS is set.
    """
    for name, why in _SYSTEMD_VARIABLES.items():
        if environ.get(name):
            raise DaemonError(f"--daemon is not for systemd: {name} is set ({why})")


def _open_log(path: str) -> IO[str]:
    """Open the log file for appending (O_APPEND survives logrotate's copytruncate).

    Raises:
        DaemonError: the file cannot be opened.
    """
    try:
        return open(path, "a", encoding="utf-8")  # closed by daemon_context
    except OSError as e:
        raise DaemonError(f"cannot open log file {path}: {e.strerror}") from None


def reopen_log(path: str) -> None:
    """Point stdout and stderr at the file now at path, creating it if it was moved away.

    logrotate without copytruncate renames the file and then signals: until the daemon
    reopens, it keeps writing to the renamed file. On failure the old file stays in use, and
    the error is logged there.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError as e:
        log.error("log_reopen_failed", log_file=path, error=e.strerror)
        return
    # What is buffered still belongs to the old file: nothing lost, nothing written twice
    # (unless that file is full: then it is dropped, as log lines are; logsetup.py).
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os.dup2(fd, sys.stdout.fileno())
    os.dup2(fd, sys.stderr.fileno())
    os.close(fd)
    log.info("log_reopened", log_file=path)


def _keep_log() -> None:
    """Without a log file there is nothing to reopen."""


@contextlib.contextmanager
def daemon_context(
    pidfile: str | None,
    files_preserve: list[int],
    log_file: str | None,
    configure_logging: Callable[[], None],
    on_pidfile: Callable[[PidFile], None] | None = None,
) -> Iterator[Callable[[], None]]:
    """Become a classic Unix daemon for the duration of the with-block.

    The checks run in the foreground; then the process forks and the original exits 0,
    so everything after entering runs in the daemon. stdout and stderr go to log_file,
    or to /dev/null without one. On leaving, the pidfile is removed if it is still ours.

    Args:
        pidfile: path of the pidfile to create with the daemon's PID, or None.
        files_preserve: fds that must stay open, i.e. the bound listeners.
        log_file: file that receives stdout and stderr, or None.
        configure_logging: sets up logging for the daemon's stdout; called in the daemon
            before anything is logged there.
        on_pidfile: given the held pidfile (a restart handoff passes its lock on).

    Yields:
        reopen_log for log_file (a no-op without one): call it on SIGHUP.

    Raises:
        DaemonError: started by systemd, already running, or a file cannot be created.
    """
    refuse_under_systemd(os.environ)
    lock = PidFile(os.path.abspath(pidfile)) if pidfile else None  # the daemon runs in /
    stale = lock.check() if lock else None
    log_stream = _open_log(log_file) if log_file else None
    # Anything still buffered would be written again by the daemon after the fork.
    sys.stdout.flush()
    sys.stderr.flush()
    context = daemon.DaemonContext(
        umask=UMASK,
        detach_process=True,  # always; the default probes stdin with a socket it leaks
        files_preserve=list(files_preserve),
        stdout=log_stream,
        stderr=log_stream,
        signal_map=_SIGNAL_MAP,
    )
    try:
        context.open()  # from here on this is the daemon, with stdout and stderr in log_file
    finally:
        # Now held as fds 1 and 2 only, so that reopen_log leaves the rotated file unused.
        if log_stream is not None:
            log_stream.close()
    try:
        configure_logging()
        if lock is not None:
            lock.acquire()  # the race-free guard behind the foreground check
            if stale is not None:
                log.warning("pidfile_stale_replaced", pidfile=lock.path, reason=stale)
            if on_pidfile is not None:
                on_pidfile(lock)
        try:
            yield (lambda: reopen_log(log_file)) if log_file else _keep_log
        finally:
            if lock is not None:
                lock.release()
    finally:
        context.close()


@contextlib.contextmanager
def continued_daemon(log_file: str | None) -> Iterator[tuple[Callable[[], None], list[PidFile]]]:
    """A daemon re-executed in place by a restart handoff: it is one already (same PID,
    session, stdout on the log file), so nothing forks. The pidfile's lock arrives with
    the handoff: whoever restores it appends the PidFile to the list yielded, and it is
    released (and the file removed) when the daemon finally stops.

    Yields:
        (reopen_log for log_file, the list that receives the held pidfile)
    """
    held: list[PidFile] = []
    try:
        yield ((lambda: reopen_log(log_file)) if log_file else _keep_log), held
    finally:
        for lock in held:
            lock.release()
