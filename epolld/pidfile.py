"""The daemon's pidfile, locked with flock(2) for as long as the daemon runs.

Whether an instance runs is the lock's to say, not the PID's: after a crash or a reboot the
PID in a pidfile can name any process (kernel.pid_max wraps), but the kernel releases a lock
when its holder exits, however it exits. So a pidfile that nobody holds is stale whatever its
PID names now, and is replaced; one that is held refuses a second instance.

python-daemon 2.3's own pidfile (PIDLockFile, from the deprecated lockfile package) is an
O_EXCL-created file with no lock: only the PID could tell, and wrongly once it is reused.
"""

from __future__ import annotations

import fcntl
import os
import stat
from typing import TYPE_CHECKING

from epolld.errors import DaemonError

if TYPE_CHECKING:
    from epolld.handoff import StateWriter

# Rounds of open-and-lock before giving up on a pidfile that keeps being replaced under us.
_ACQUIRE_ATTEMPTS = 3
_MAX_PIDFILE_BYTES = 64  # a PID and a newline; anything longer is not ours


class PidFile:
    """A pidfile at an absolute path: checked in the foreground, held by the daemon.

    Args:
        path: absolute path of the pidfile (the daemon runs from /).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    def check(self) -> str | None:
        """Refuse a second instance, before forking, while errors still reach the terminal.

        Returns:
            None when there is no pidfile; else why the one there is stale, to be logged
            when the daemon replaces it.

        Raises:
            DaemonError: a running instance holds the pidfile, it cannot be read, or its
                directory is missing or not writable.
        """
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            stale = None
        except OSError as e:
            raise DaemonError(f"cannot read pidfile {self.path}: {e.strerror}") from None
        else:
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):  # the daemon could not write it
                    raise DaemonError(f"cannot use pidfile {self.path}: not a regular file")
                # A shared lock is enough to learn whether the daemon's exclusive one is held.
                if not _try_lock(fd, fcntl.LOCK_SH):
                    raise DaemonError(self._already_running(_read_pid(fd)))
                stale = _why_stale(_read_pid(fd))
            finally:
                os.close(fd)
        directory = os.path.dirname(self.path)
        if not os.access(directory, os.W_OK | os.X_OK):
            raise DaemonError(
                f"cannot create pidfile {self.path}: {directory} is missing or not writable"
            )
        return stale

    def acquire(self) -> None:
        """In the daemon: lock the pidfile (creating it) and write our PID into it.

        Raises:
            DaemonError: another instance holds it (it won a race with our check), or it
                cannot be created.
        """
        for _ in range(_ACQUIRE_ATTEMPTS):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise DaemonError(f"cannot create pidfile {self.path}: {e.strerror}") from None
            if not _try_lock(fd, fcntl.LOCK_EX):
                pid = _read_pid(fd)
                os.close(fd)
                raise DaemonError(self._already_running(pid))
            # The previous holder may have unlinked the file between our open() and flock():
            # then we hold a lock on a file nobody can find, and must lock the one at path.
            if _names(self.path, fd):
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode("ascii"))
                self._fd = fd
                return
            os.close(fd)
        raise DaemonError(f"cannot lock pidfile {self.path}: it keeps being replaced")

    def handoff_state(self, out: StateWriter) -> dict[str, object] | None:
        """For a re-exec in place: the locked descriptor travels, so the lock is held
        throughout and the file keeps naming this PID."""
        if self._fd is None:
            return None
        return {"kind": "pidfile", "fd": out.fd(self._fd), "path": self.path}

    def adopt(self, fd: int) -> None:
        """Hold the pidfile through a descriptor handed over by a re-exec (same PID).

        Raises:
            DaemonError: it no longer names the file at path, or the lock was lost.
        """
        if not _names(self.path, fd) or not _try_lock(fd, fcntl.LOCK_EX):
            os.close(fd)
            raise DaemonError(f"pidfile {self.path}: the handed-over lock is not the file's")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd = fd

    def release(self) -> None:
        """Remove the pidfile if it is still ours, then drop the lock. Idempotent."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            # Unlinked before the lock goes, so that nobody locks a file about to vanish.
            if _names(self.path, fd):
                os.unlink(self.path)
        except OSError:
            pass  # removed by hand, or its directory went away: nothing left to clean up
        finally:
            os.close(fd)

    def _already_running(self, pid: int | None) -> str:
        as_pid = f" as PID {pid}" if pid is not None else ""
        return f"already running{as_pid} (pidfile {self.path})"


def _try_lock(fd: int, operation: int) -> bool:
    """flock(fd, operation) without blocking; False if another process holds a lock."""
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
    except BlockingIOError:  # EWOULDBLOCK
        return False
    return True


def _read_pid(fd: int) -> int | None:
    """The PID written in the file, or None if it holds none (empty, junk, not yet written)."""
    try:
        pid = int(os.pread(fd, _MAX_PIDFILE_BYTES, 0).decode("ascii").strip())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return pid if pid > 0 else None


def _names(path: str, fd: int) -> bool:
    """Whether path still names the file open as fd."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def _why_stale(pid: int | None) -> str:
    """Why an unlocked pidfile holding pid is stale, in words for the log."""
    if pid is None:
        return "it holds no PID"
    comm = _running_command(pid)
    if comm is None:
        return f"PID {pid} no longer runs"
    if pid == os.getpid():
        return f"PID {pid} is now this process"
    return f"PID {pid} now belongs to another process ({comm}) that does not hold the lock"


def _running_command(pid: int) -> str | None:
    """The command name of a running process, or None if it is gone (a zombie is gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            stat = f.read()
    except OSError:
        return None
    # "PID (COMM) STATE ...": the name may itself hold spaces and parentheses.
    comm, _, rest = stat.partition(" (")[2].rpartition(")")
    return None if rest.split()[:1] == ["Z"] else comm
