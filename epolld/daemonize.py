"""Classic daemon mode with python-daemon, for hosts without systemd.

The CLI validates the config and binds its listeners first, so that mistakes still reach
the terminal, and only then enters daemon_context(). python-daemon 2.3.2 (Debian 12)
does the rest: fork twice with setsid, chdir /, close every fd not preserved and point
stdin/stdout/stderr elsewhere. Its pidfile comes from the deprecated lockfile package
(an O_EXCL-created file holding the PID, no fcntl lock), so a stale one is detected and
removed here, and a live one is reported before forking.

Never use this under systemd: it would close socket-activation fds and the journal
stream, and systemd would lose track of the main PID.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator, Mapping
from typing import IO

import daemon
import daemon.pidfile
import lockfile
import lockfile.pidlockfile

from epolld.errors import DaemonError

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


def _is_alive(pid: int) -> bool:
    """Whether a process with this PID exists (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # EPERM: it exists but belongs to another user
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            # The state follows the command name, which is in parentheses and may hold spaces.
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _claim_pidfile(path: str) -> lockfile.pidlockfile.PIDLockFile:
    """Check the pidfile before forking, while errors still reach the terminal.

    A pidfile of a live process refuses the start; one of a dead process (or unreadable
    junk) is stale and removed, since lockfile's O_EXCL create would otherwise fail.

    Raises:
        DaemonError: another instance runs, or the pidfile's directory is not writable.
    """
    pid = lockfile.pidlockfile.read_pid_from_pidfile(path)
    if pid is not None and pid != os.getpid() and _is_alive(pid):
        raise DaemonError(f"already running as PID {pid} (pidfile {path})")
    directory = os.path.dirname(path)
    if not os.access(directory, os.W_OK | os.X_OK):
        raise DaemonError(f"cannot create pidfile {path}: {directory} is missing or not writable")
    lock = daemon.pidfile.TimeoutPIDLockFile(path, acquire_timeout=0)
    try:
        lock.break_lock()
    except OSError as e:
        raise DaemonError(f"cannot remove stale pidfile {path}: {e.strerror}") from None
    return lock


def _open_log(path: str) -> IO[str]:
    """Open the log file for appending (O_APPEND survives logrotate's copytruncate).

    Raises:
        DaemonError: the file cannot be opened.
    """
    try:
        return open(path, "a", encoding="utf-8")  # closed by daemon_context
    except OSError as e:
        raise DaemonError(f"cannot open log file {path}: {e.strerror}") from None


@contextlib.contextmanager
def daemon_context(
    pidfile: str | None, files_preserve: list[int], log_file: str | None
) -> Iterator[None]:
    """Become a classic Unix daemon for the duration of the with-block.

    The checks run in the foreground; then the process forks and the original exits 0,
    so everything after entering runs in the daemon. stdout and stderr go to log_file
    (configure logging after entering), or to /dev/null without one. On leaving, the
    pidfile is removed if it still holds our PID.

    Args:
        pidfile: path of the pidfile to create with the daemon's PID, or None.
        files_preserve: fds that must stay open, i.e. the bound listeners.
        log_file: file that receives stdout and stderr, or None.

    Raises:
        DaemonError: started by systemd, already running, or a file cannot be created.
    """
    refuse_under_systemd(os.environ)
    path = os.path.abspath(pidfile) if pidfile else None  # the daemon runs in /
    lock = _claim_pidfile(path) if path else None
    log = _open_log(log_file) if log_file else None
    # Anything still buffered would be written again by the daemon after the fork.
    sys.stdout.flush()
    sys.stderr.flush()
    context = daemon.DaemonContext(
        umask=UMASK,
        detach_process=True,  # always; the default probes stdin with a socket it leaks
        files_preserve=list(files_preserve),
        stdout=log,
        stderr=log,
        signal_map=_SIGNAL_MAP,
    )
    try:
        context.open()  # from here on this is the daemon, with stderr in log_file
        if lock is not None:
            try:
                # O_EXCL create: the race-free guard behind the foreground check.
                lock.acquire()
            except lockfile.Error as e:
                raise DaemonError(f"cannot create pidfile {path}: {e}") from None
        try:
            yield
        finally:
            if lock is not None:
                # NotLocked/NotMyLock: removed or replaced by someone else; not ours to delete.
                with contextlib.suppress(lockfile.Error, OSError):
                    lock.release()
            context.close()
    finally:
        if log is not None:
            log.close()
