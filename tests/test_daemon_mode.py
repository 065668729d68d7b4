"""Classic daemon mode (epolld.daemonize) with real processes, pidfiles and sockets.

The daemons here detach (double fork), so they are not our children: a test finds them
through the pidfile, waits on /proc, and kills any survivor by PID in teardown.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.traffic import echo_until_eof

pytestmark = pytest.mark.slow

WAIT_S = 10.0  # upper bound of every wait; real runs take well under a second

# A stand-in for `epolld --daemon`, in the CLI's order: bind (errors still reach the
# terminal), daemon_context(), then its own SIGTERM handling. It echoes on one listener
# until SIGTERM and logs one JSON line per event to stdout, i.e. the log file.
DAEMON_SCRIPT = textwrap.dedent(
    """
    import json, os, select, signal, socket, sys
    from epolld.observability import logsetup
    from epolld.daemonize import daemon_context
    from epolld.errors import EpolldError

    def main(pidfile, log_file):
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        try:
            with daemon_context(pidfile or None, [listener.fileno()], log_file or None,
                                lambda: logsetup.configure("info", "json")):
                wakeup_r, wakeup_w = socket.socketpair()
                wakeup_w.setblocking(False)
                signal.set_wakeup_fd(wakeup_w.fileno())
                signal.signal(signal.SIGTERM, lambda *_: None)
                print(json.dumps({"event": "started", "pid": os.getpid(),
                                  "port": listener.getsockname()[1],
                                  "umask": os.umask(0o022), "cwd": os.getcwd()}), flush=True)
                while True:
                    ready, _, _ = select.select([listener, wakeup_r], [], [])
                    if wakeup_r in ready:
                        break
                    conn, _ = listener.accept()
                    with conn:
                        while data := conn.recv(65536):
                            conn.sendall(data)
                print(json.dumps({"event": "stopped"}), flush=True)
        except EpolldError as e:
            print(f"Error: {e}", file=sys.stderr)
            return e.exit_code
        return 0

    raise SystemExit(main(sys.argv[1], sys.argv[2]))
    """
)


def _is_gone(pid: int) -> bool:
    """Whether pid no longer runs (gone, or a zombie nobody has reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _wait_for(what: str, predicate: Callable[[], bool]) -> None:
    """Poll predicate() until true; fail after WAIT_S naming what was awaited."""
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {WAIT_S} s waiting for {what}")
        time.sleep(0.02)


def _read_pid(path: Path, replaced: str | None = None) -> int:
    """Wait until the pidfile holds a complete line other than replaced and return its PID."""

    def written() -> bool:
        text = path.read_text() if path.exists() else ""
        return text.endswith("\n") and text != replaced

    _wait_for(f"{path} to hold a new PID", written)
    return int(path.read_text())


def _log_events(path: Path) -> list[str]:
    """The event names logged to path so far."""
    return [json.loads(line)["event"] for line in path.read_text().splitlines()]


class Daemons:
    """Starts daemons (stand-in or epolld) and kills, by PID, whatever they leave running."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.script = tmp_path / "standin.py"
        self.script.write_text(DAEMON_SCRIPT)
        self.config = tmp_path / "epolld.yaml"
        self.pids: list[int] = []

    def run(
        self, argv: list[str], pidfile: Path | None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run the foreground part; it returns once the daemon has forked off."""
        # A stale pidfile is replaced by the daemon after the foreground has returned.
        before = pidfile.read_text() if pidfile is not None and pidfile.is_file() else None
        result = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=WAIT_S,
            env={**os.environ, **(env or {})},
            check=False,
        )
        if result.returncode == 0 and pidfile is not None:
            self.pids.append(_read_pid(pidfile, replaced=before))
        return result

    def start(
        self, pidfile: Path | None, log_file: Path | None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Start the stand-in script with this pidfile and log file."""
        argv = [sys.executable, str(self.script), str(pidfile or ""), str(log_file or "")]
        return self.run(argv, pidfile, env)

    def start_epolld(
        self, settings: dict[str, Any], *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Start the real `epolld --daemon` with these settings written to a config file."""
        self.config.write_text(yaml.safe_dump(settings))
        argv = [sys.executable, "-m", "epolld", "--config", str(self.config), "--daemon", *args]
        pidfile = settings.get("daemon", {}).get("pidfile")
        return self.run(argv, Path(pidfile) if pidfile else None, env)

    def kill_all(self) -> None:
        for pid in self.pids:
            if not _is_gone(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Daemons]:
    d = Daemons(tmp_path)
    yield d
    d.kill_all()


def _started(log: Path) -> dict[str, Any]:
    """Wait for the daemon's 'started' line in its log file and return it."""
    return _logged(log, "started")[0]


def test_pidfile_holds_daemon_pid_and_listener_survives(daemons: Daemons, tmp_path: Path) -> None:
    """The foreground exits 0, the pidfile names the detached daemon, the kept listener echoes."""
    pidfile, log = tmp_path / "epolld.pid", tmp_path / "epolld.log"
    result = daemons.start(pidfile, log)
    assert result.returncode == 0, result.stderr
    pid = daemons.pids[0]
    started = _started(log)
    assert started["pid"] == pid
    assert not _is_gone(pid)
    assert os.getsid(pid) != os.getsid(0)  # setsid(): detached from our session
    assert started["umask"] == 0o022
    assert started["cwd"] == "/"
    assert echo_until_eof(int(started["port"]), b"hello daemon\n") == b"hello daemon\n"


def test_sigterm_stops_daemon_and_removes_pidfile(daemons: Daemons, tmp_path: Path) -> None:
    """SIGTERM reaches the daemon's own handler (not python-daemon's) and the pidfile goes away."""
    pidfile, log = tmp_path / "epolld.pid", tmp_path / "epolld.log"
    assert daemons.start(pidfile, log).returncode == 0
    pid = daemons.pids[0]
    _started(log)
    os.kill(pid, signal.SIGTERM)
    _wait_for("the daemon to exit", lambda: _is_gone(pid))
    assert not pidfile.exists()
    # Its own loop saw the signal and ran to the end of the with-block.
    assert _log_events(log) == ["started", "stopped"]


def test_second_instance_refuses_while_first_runs(daemons: Daemons, tmp_path: Path) -> None:
    """A second start with the same pidfile fails in the foreground, naming the running PID."""
    pidfile, log = tmp_path / "epolld.pid", tmp_path / "epolld.log"
    assert daemons.start(pidfile, log).returncode == 0
    pid = daemons.pids[0]
    second = daemons.start(pidfile, tmp_path / "second.log")
    assert second.returncode == os.EX_OSERR
    assert second.stderr == f"Error: already running as PID {pid} (pidfile {pidfile})\n"
    assert int(pidfile.read_text()) == pid
    assert not (tmp_path / "second.log").exists()


def _exited_pid() -> int:
    """The PID of a process that has run and been reaped: nothing runs under it now."""
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
        timeout=WAIT_S,
    )
    return int(dead.stdout)


@pytest.fixture
def unrelated_pid() -> Iterator[int]:
    """The PID of a live process that is not a daemon (sleep), ended by PID afterwards."""
    sleeper = subprocess.Popen(["sleep", "600"])
    yield sleeper.pid
    sleeper.kill()
    sleeper.wait()


def _stale_warnings(log: Path) -> list[dict[str, Any]]:
    """The daemon's pidfile_stale_replaced entries in its JSON log file."""
    return _logged(log, "pidfile_stale_replaced")


def test_stale_pidfile_is_replaced(daemons: Daemons, tmp_path: Path) -> None:
    """A pidfile left by a dead process does not block the start, is logged, gets the new PID."""
    dead_pid = _exited_pid()
    pidfile, log = tmp_path / "epolld.pid", tmp_path / "epolld.log"
    pidfile.write_text(f"{dead_pid}\n")
    result = daemons.start(pidfile, log)
    assert result.returncode == 0, result.stderr
    assert daemons.pids[0] != dead_pid
    assert _started(log)["pid"] == daemons.pids[0]
    (warning,) = _stale_warnings(log)
    assert warning["level"] == "warning"
    assert warning["pidfile"] == str(pidfile)
    assert warning["reason"] == f"PID {dead_pid} no longer runs"


def test_pidfile_naming_another_process_is_replaced(
    daemons: Daemons, tmp_path: Path, unrelated_pid: int
) -> None:
    """A pidfile whose PID now belongs to an unrelated process is stale: replaced, that one kept."""
    pidfile, log = tmp_path / "epolld.pid", tmp_path / "epolld.log"
    pidfile.write_text(f"{unrelated_pid}\n")
    result = daemons.start(pidfile, log)
    assert result.returncode == 0, result.stderr
    assert int(pidfile.read_text()) == daemons.pids[0] != unrelated_pid
    (warning,) = _stale_warnings(log)
    assert warning["reason"] == (
        f"PID {unrelated_pid} now belongs to another process (sleep) that does not hold the lock"
    )
    assert not _is_gone(unrelated_pid), "the unrelated process is left alone"


def test_pidfile_without_a_pid_is_replaced(daemons: Daemons, tmp_path: Path) -> None:
    """An unlocked pidfile holding junk (a torn write, an editor's leftovers) is replaced."""
    pidfile, log = tmp_path / "epolld.pid", tmp_path / "epolld.log"
    pidfile.write_text("not a pid\n")
    assert daemons.start(pidfile, log).returncode == 0
    assert int(pidfile.read_text()) == daemons.pids[0]
    assert _stale_warnings(log)[0]["reason"] == "it holds no PID"


def test_locked_pidfile_refuses_whatever_pid_it_names(daemons: Daemons, tmp_path: Path) -> None:
    """The lock, not the PID, tells a live instance: a held pidfile refuses even with a dead PID."""
    dead_pid = _exited_pid()
    pidfile, log = tmp_path / "epolld.pid", tmp_path / "epolld.log"
    pidfile.write_text(f"{dead_pid}\n")
    with open(pidfile, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as the instance that owns it would
        result = daemons.start(pidfile, log)
    assert result.returncode == os.EX_OSERR
    assert result.stderr == f"Error: already running as PID {dead_pid} (pidfile {pidfile})\n"
    assert pidfile.read_text() == f"{dead_pid}\n"
    assert not log.exists()


@pytest.mark.parametrize("variable", ["NOTIFY_SOCKET", "LISTEN_FDS"])
def test_refused_under_systemd(daemons: Daemons, tmp_path: Path, variable: str) -> None:
    """With NOTIFY_SOCKET or LISTEN_FDS set, nothing forks and the terminal gets the reason."""
    pidfile, log = tmp_path / "epolld.pid", tmp_path / "epolld.log"
    value = "/run/systemd/notify" if variable == "NOTIFY_SOCKET" else "1"
    result = daemons.start(pidfile, log, env={variable: value})
    assert result.returncode == os.EX_OSERR
    assert result.stderr.startswith(f"Error: --daemon is not for systemd: {variable} is set (")
    assert not pidfile.exists()
    assert not log.exists()


def test_unwritable_pidfile_directory_reported_in_foreground(
    daemons: Daemons, tmp_path: Path
) -> None:
    """A pidfile in a missing directory is refused before forking, with the path in the message."""
    pidfile = tmp_path / "missing" / "epolld.pid"
    result = daemons.start(pidfile, tmp_path / "epolld.log")
    assert result.returncode == os.EX_OSERR
    assert result.stderr == (
        f"Error: cannot create pidfile {pidfile}: {pidfile.parent} is missing or not writable\n"
    )


def test_pidfile_that_is_not_a_file_is_refused_in_foreground(
    daemons: Daemons, tmp_path: Path
) -> None:
    """A directory at the pidfile's path is reported on the terminal instead of forking."""
    pidfile = tmp_path / "epolld.pid"
    pidfile.mkdir()
    result = daemons.start(pidfile, tmp_path / "epolld.log")
    assert result.returncode == os.EX_OSERR
    assert result.stderr == f"Error: cannot use pidfile {pidfile}: not a regular file\n"
    assert not (tmp_path / "epolld.log").exists()


# The real `epolld --daemon`: the CLI binds, then runs its loop inside daemon_context().


def _epolld_settings(tmp_path: Path, port: int = 0) -> dict[str, Any]:
    """A config on an ephemeral loopback port, with pidfile and JSON log file in tmp_path."""
    return {
        "listen": [f"127.0.0.1:{port}"],
        "logging": {"format": "json"},
        "daemon": {
            "pidfile": str(tmp_path / "epolld.pid"),
            "log_file": str(tmp_path / "epolld.log"),
        },
    }


def _logged(log: Path, event: str, count: int = 1) -> list[dict[str, Any]]:
    """Wait until the JSON log file holds count entries named event, and return them."""

    def found() -> list[dict[str, Any]]:
        lines = log.read_text().splitlines() if log.exists() else []
        return [e for e in map(json.loads, lines) if e.get("event") == event]

    _wait_for(f"{count}x {event} in {log}", lambda: len(found()) >= count)
    return found()


def _listening_port(log: Path) -> int:
    """The port of the daemon's first listener, from its 'listening' log entry."""
    return int(_logged(log, "listening")[0]["address"].rpartition(":")[2])


def test_epolld_daemon_pidfile_andecho_until_eof(daemons: Daemons, tmp_path: Path) -> None:
    """`epolld --daemon` returns 0 once detached; its pidfile names the process that echoes."""
    settings = _epolld_settings(tmp_path)
    result = daemons.start_epolld(settings)
    assert result.returncode == 0, result.stderr
    assert result.stdout == result.stderr == ""
    pid = daemons.pids[0]
    assert not _is_gone(pid)
    port = _listening_port(tmp_path / "epolld.log")
    assert echo_until_eof(port, b"x" * 100_000) == b"x" * 100_000


def test_epolld_daemon_sigterm_removes_pidfile(daemons: Daemons, tmp_path: Path) -> None:
    """SIGTERM drains and stops the daemon as in the foreground, and its pidfile is removed."""
    result = daemons.start_epolld(_epolld_settings(tmp_path))
    assert result.returncode == 0, result.stderr
    pid, log = daemons.pids[0], tmp_path / "epolld.log"
    _listening_port(log)
    os.kill(pid, signal.SIGTERM)
    _wait_for("the daemon to exit", lambda: _is_gone(pid))
    assert not (tmp_path / "epolld.pid").exists()
    assert _logged(log, "shutdown_complete")


def test_epolld_daemon_sighup_reloads(daemons: Daemons, tmp_path: Path) -> None:
    """SIGHUP makes the detached daemon reload its config file, keeping its PID and pidfile."""
    settings = _epolld_settings(tmp_path)
    assert daemons.start_epolld(settings).returncode == 0
    pid, log = daemons.pids[0], tmp_path / "epolld.log"
    port = _listening_port(log)
    settings["limits"] = {"idle_timeout": "42s"}
    daemons.config.write_text(yaml.safe_dump(settings))
    os.kill(pid, signal.SIGHUP)
    (reloaded,) = _logged(log, "config_reloaded")
    assert "limits.idle_timeout" in json.dumps(reloaded["changes"])
    assert int((tmp_path / "epolld.pid").read_text()) == pid
    assert echo_until_eof(port, b"after reload") == b"after reload"


def test_epolld_second_instance_refused(daemons: Daemons, tmp_path: Path) -> None:
    """While one daemon runs, a second start with its pidfile exits 71 naming the running PID."""
    settings = _epolld_settings(tmp_path)
    assert daemons.start_epolld(settings).returncode == 0
    pid = daemons.pids[0]
    port = _listening_port(tmp_path / "epolld.log")
    settings["listen"] = ["127.0.0.1:0"]  # a free address: only the pidfile may stop it
    second = daemons.start_epolld(settings)
    assert second.returncode == os.EX_OSERR
    pidfile = tmp_path / "epolld.pid"
    assert second.stderr == f"Error: already running as PID {pid} (pidfile {pidfile})\n"
    assert int(pidfile.read_text()) == pid
    assert echo_until_eof(port, b"still here") == b"still here"


def test_epolld_daemon_refused_under_systemd(daemons: Daemons, tmp_path: Path) -> None:
    """With NOTIFY_SOCKET set, `epolld --daemon` exits 71 on the terminal and tells systemd why."""
    notify_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.settimeout(WAIT_S)
        result = daemons.start_epolld(
            _epolld_settings(tmp_path), env={"NOTIFY_SOCKET": str(notify_path)}
        )
        message = notify.recv(4096).decode()
    assert result.returncode == os.EX_OSERR
    assert result.stderr.startswith("Error: --daemon is not for systemd: NOTIFY_SOCKET is set (")
    assert "STATUS=--daemon is not for systemd" in message
    assert not (tmp_path / "epolld.pid").exists()


def test_epolld_daemon_bind_error_reaches_terminal(daemons: Daemons, tmp_path: Path) -> None:
    """An address in use is reported on the terminal with exit 69, before anything detaches."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = daemons.start_epolld(_epolld_settings(tmp_path, port=busy.getsockname()[1]))
    assert result.returncode == os.EX_UNAVAILABLE
    assert result.stderr.startswith("Error: ")
    assert "in use" in result.stderr
    assert not (tmp_path / "epolld.pid").exists()
    assert not (tmp_path / "epolld.log").exists()


def test_epolld_replaces_pidfile_of_killed_daemon(daemons: Daemons, tmp_path: Path) -> None:
    """After a daemon died without cleaning up (SIGKILL), the next start logs and replaces it."""
    settings = _epolld_settings(tmp_path)
    assert daemons.start_epolld(settings).returncode == 0
    killed, pidfile = daemons.pids[0], tmp_path / "epolld.pid"
    _listening_port(tmp_path / "epolld.log")
    os.kill(killed, signal.SIGKILL)
    _wait_for("the daemon to die", lambda: _is_gone(killed))
    assert int(pidfile.read_text()) == killed, "SIGKILL leaves the pidfile behind"

    settings["daemon"]["log_file"] = str(tmp_path / "second.log")
    result = daemons.start_epolld(settings)
    assert result.returncode == 0, result.stderr
    assert int(pidfile.read_text()) == daemons.pids[1] != killed
    (warning,) = _stale_warnings(tmp_path / "second.log")
    assert warning["reason"] == f"PID {killed} no longer runs"
    assert echo_until_eof(_listening_port(tmp_path / "second.log"), b"new one") == b"new one"


def test_epolld_replaces_pidfile_naming_another_process(
    daemons: Daemons, tmp_path: Path, unrelated_pid: int
) -> None:
    """`epolld --daemon` starts over a pidfile whose PID is now a process of another program."""
    settings = _epolld_settings(tmp_path)
    pidfile = tmp_path / "epolld.pid"
    pidfile.write_text(f"{unrelated_pid}\n")
    result = daemons.start_epolld(settings)
    assert result.returncode == 0, result.stderr
    assert int(pidfile.read_text()) == daemons.pids[0] != unrelated_pid
    (warning,) = _stale_warnings(tmp_path / "epolld.log")
    assert "now belongs to another process (sleep)" in warning["reason"]
    assert not _is_gone(unrelated_pid)
    assert echo_until_eof(_listening_port(tmp_path / "epolld.log"), b"x") == b"x"


# Log rotation without copytruncate: mv the file away, SIGHUP, the daemon writes to a new one.


def _events(log: Path) -> list[str]:
    """The event names in a JSON log file, in order."""
    return [json.loads(line)["event"] for line in log.read_text().splitlines()]


def _open_files(pid: int) -> set[str]:
    """The paths of the files a process has open."""
    fds = Path(f"/proc/{pid}/fd")
    return {os.readlink(fd) for fd in fds.iterdir()}


def _rotate(log: Path) -> Path:
    """What logrotate does before its postrotate script: rename the file (no copy, no truncate)."""
    rotated = log.with_name(log.name + ".1")
    log.rename(rotated)
    return rotated


def test_epolld_reopens_log_file_on_sighup(daemons: Daemons, tmp_path: Path) -> None:
    """After a rename and SIGHUP, lines go to a new file at the path; none is lost or repeated."""
    settings = _epolld_settings(tmp_path)
    assert daemons.start_epolld(settings).returncode == 0
    pid, log = daemons.pids[0], tmp_path / "epolld.log"
    port = _listening_port(log)
    os.kill(pid, signal.SIGUSR1)
    _logged(log, "stats")
    rotated = _rotate(log)
    # Between the rename and the signal the daemon still writes to the renamed file.
    os.kill(pid, signal.SIGUSR1)
    _logged(rotated, "stats", count=2)
    assert not log.exists()

    os.kill(pid, signal.SIGHUP)
    _logged(log, "config_reloaded")
    os.kill(pid, signal.SIGUSR1)
    _logged(log, "stats")

    assert _events(log) == ["log_reopened", "config_reloaded", "stats"]
    old = _events(rotated)
    assert old.count("stats") == 2
    assert "log_reopened" not in old
    assert "config_reloaded" not in old
    (reopened,) = _logged(log, "log_reopened")
    assert reopened["log_file"] == str(log)
    assert str(rotated) not in _open_files(pid), "the rotated file is let go"
    assert str(log) in _open_files(pid)
    assert echo_until_eof(port, b"after rotation") == b"after rotation"


def test_epolld_reopens_log_file_even_when_reload_is_invalid(
    daemons: Daemons, tmp_path: Path
) -> None:
    """A SIGHUP with a broken config still moves the log to the new file, and says so there."""
    settings = _epolld_settings(tmp_path)
    assert daemons.start_epolld(settings).returncode == 0
    pid, log = daemons.pids[0], tmp_path / "epolld.log"
    port = _listening_port(log)
    rotated = _rotate(log)
    daemons.config.write_text("listen: [\n")
    os.kill(pid, signal.SIGHUP)
    (failed,) = _logged(log, "config_reload_failed")
    assert failed["level"] == "error"
    assert _events(log) == ["log_reopened", "config_reload_failed"]
    assert "log_reopened" not in _events(rotated)
    assert str(rotated) not in _open_files(pid)
    assert echo_until_eof(port, b"old config") == b"old config"


def test_epolld_keeps_old_log_file_when_reopen_fails(daemons: Daemons, tmp_path: Path) -> None:
    """When the path cannot be opened (here: a directory took its place), the old file stays."""
    settings = _epolld_settings(tmp_path)
    assert daemons.start_epolld(settings).returncode == 0
    pid, log = daemons.pids[0], tmp_path / "epolld.log"
    port = _listening_port(log)
    rotated = _rotate(log)
    log.mkdir()
    os.kill(pid, signal.SIGHUP)
    (failed,) = _logged(rotated, "log_reopen_failed")
    assert failed["level"] == "error"
    assert failed["log_file"] == str(log)
    assert failed["error"] == "Is a directory"
    _logged(rotated, "config_reloaded")  # the reload itself went ahead
    assert str(rotated) in _open_files(pid)
    assert echo_until_eof(port, b"still logging") == b"still logging"
