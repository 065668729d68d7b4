"""Boot a real systemd (Debian 12's) in a systemd-nspawn container, for the system tests.

What works on these machines is in shared/NOTES.md; in short:

- The root file system is built once by packaging/dev/nspawn-rootfs and cached in .cache/nspawn/
  (keyed by the script's hash, so editing the script rebuilds it). Each boot uses
  --volatile=overlay: writes go to a tmpfs and the cache stays pristine.
- Without a systemd on the host, nspawn needs --register=no and --keep-unit, and then splits the
  cgroup it was started in: each container is started from cgroups of its own (one per
  hierarchy), removed after power-off.
- PID 1 in the container is nspawn's child named "systemd"; commands run with `nsenter -a` on it
  (machinectl and `systemctl -M` need machined, which is absent).
- Each container has a network namespace of its own (--private-network: only a loopback, which
  its systemd brings up), so a daemon inside serves the package's default 127.0.0.1:7080 and
  [::1]:7080 whatever listens on the host's. A test reaches it by creating its sockets inside
  Container.network(); apt-get reaches the package mirror with run(..., host_network=True).

Usage (the fixtures in conftest.py do this)::

    with Container(binds_ro={REPO: "/opt/epolld"}) as c:
        c.run("systemctl", "start", "epolld")
        c.write_file("/etc/epolld.yaml", text)
        with c.network():
            sock = socket.create_connection(("127.0.0.1", 7080))
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[2]
CACHE_DIR = REPO / ".cache" / "nspawn"
ROOTFS_SCRIPT = REPO / "packaging" / "dev" / "nspawn-rootfs"
APT_INSTALL = REPO / "packaging" / "dev" / "apt-install"

BOOT_TIMEOUT_S = 60.0
POWEROFF_TIMEOUT_S = 30.0
COMMAND_TIMEOUT_S = 120.0
ROOTFS_BUILD_TIMEOUT_S = 900.0
CGROUP_HIERARCHIES = ("unified", "systemd")  # cgroup v2 and the v1 name=systemd hierarchy
NAME_PREFIX = "epolld-test"
# A clean environment for commands in the container: not the host's PATH (pyenv) or locale.
GUEST_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "SYSTEMD_COLORS": "0",
    "SYSTEMD_PAGER": "",
    "TERM": "dumb",
}

CLONE_NEWNET = 0x40000000  # <sched.h>; os.setns() is Python 3.12+, so setns(2) goes via ctypes

_counter = itertools.count()
T = TypeVar("T")
_libc = ctypes.CDLL(None, use_errno=True)
# The test process's own network namespace, opened before any test enters a container's: what
# host_network=True commands run in, whichever namespace the calling thread is in then.
_HOST_NETNS_FD = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)


class ContainerError(RuntimeError):
    """The container could not be booted, or a command in it failed."""


def missing_privileges() -> str | None:
    """Why the container tests cannot run here, or None when they can (we are root)."""
    if os.geteuid() != 0:
        return "needs root: systemd-nspawn, cgroups and mmdebstrap require it"
    return None


def ensure_tools() -> None:
    """Install systemd-nspawn, pinned to the host's systemd version, when it is missing.

    Installing systemd-container pulls libsystemd-shared to its own version: pinning keeps the
    host's systemd from being upgraded as a side effect.
    """
    if shutil.which("systemd-nspawn") and shutil.which("nsenter"):
        return
    version = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", "systemd"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    _run_host([str(APT_INSTALL), f"systemd-container={version}", "util-linux"])


def ensure_host_tool(command: str, package: str) -> None:
    """Install a package on the host when its command is missing (e.g. strace, which
    the tests run from the host on a process in the container)."""
    if shutil.which(command) is None:
        _run_host([str(APT_INSTALL), package])


def rootfs() -> Path:
    """The cached root file system, built first when missing or when its script changed.

    A lock serialises concurrent builders (two test runs, or two helpers' test files).
    """
    key = hashlib.sha256(ROOTFS_SCRIPT.read_bytes()).hexdigest()[:12]
    path = CACHE_DIR / f"bookworm-{key}"
    if (path / "usr" / "bin" / "python3").exists():
        return path
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / "usr" / "bin" / "python3").exists():
            _run_host([str(ROOTFS_SCRIPT), str(path)], timeout=ROOTFS_BUILD_TIMEOUT_S)
            for stale in CACHE_DIR.glob("bookworm-*"):  # built by an older script
                if stale != path and stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
    return path


def wait_until(
    check: Callable[[], T | None], timeout: float, what: str, interval: float = 0.1
) -> T:
    """Poll check() until it returns something other than None or False; return that.

    Raises:
        TimeoutError: naming what was awaited, after timeout seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None and result is not False:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class Container:
    """One booted systemd-nspawn container with a real systemd as PID 1.

    Args:
        binds_ro: host path -> guest path, bind-mounted read-only.
        binds: host path -> guest path, bind-mounted read-write.
        name: machine and cgroup name; unique by default.
    """

    def __init__(
        self,
        binds_ro: Mapping[str | Path, str] | None = None,
        binds: Mapping[str | Path, str] | None = None,
        name: str | None = None,
    ) -> None:
        self.name = name or f"{NAME_PREFIX}-{os.getpid()}-{next(_counter)}"
        self.binds_ro = dict(binds_ro or {})
        self.binds = dict(binds or {})
        self.log_path = CACHE_DIR / "logs" / f"{self.name}.log"
        self._nspawn: subprocess.Popen[bytes] | None = None
        self.leader = 0  # host PID of the container's PID 1

    # Lifecycle

    def start(self, timeout: float = BOOT_TIMEOUT_S) -> Container:
        """Boot the container and wait until systemd reports running (or degraded)."""
        reason = missing_privileges()
        if reason:
            raise ContainerError(reason)
        ensure_tools()
        root = rootfs()
        _remove_stale_cgroups()
        self._make_cgroups()
        args = [
            "systemd-nspawn", "--quiet", "--boot", f"--directory={root}",
            f"--machine={self.name}", "--register=no", "--keep-unit", "--volatile=overlay",
            "--console=read-only", "--private-network",
        ]  # fmt: skip
        args += [f"--bind-ro={host}:{guest}" for host, guest in self.binds_ro.items()]
        args += [f"--bind={host}:{guest}" for host, guest in self.binds.items()]
        # The shell moves itself into the container's cgroups, then becomes nspawn.
        script = "".join(
            f"echo $$ > /sys/fs/cgroup/{h}/{self.name}/cgroup.procs && " for h in CGROUP_HIERARCHIES
        )
        script += 'exec "$@"'
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self._nspawn = subprocess.Popen(
                ["sh", "-c", script, "sh", *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self.leader = wait_until(self._find_leader, timeout, "the container's systemd")
            state = wait_until(self._booted, timeout, "systemctl is-system-running")
            if state == "degraded":
                failed = self.run("systemctl", "--failed", "--no-legend", check=False).stdout
                print(f"container {self.name} booted degraded; failed units:\n{failed}")
        except Exception as e:
            console = self.boot_log()[-4000:]
            self.stop()
            raise ContainerError(f"container {self.name} did not boot: {e}\n{console}") from e
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Power off with SIGTERM to nspawn (SIGKILL if it hangs) and remove the cgroups."""
        nspawn, self._nspawn = self._nspawn, None
        if nspawn is not None and nspawn.poll() is None:
            nspawn.send_signal(signal.SIGTERM)
            try:
                nspawn.wait(timeout=POWEROFF_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                nspawn.kill()
                nspawn.wait()
        self.leader = 0
        _remove_cgroups(self.name)
        self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> Container:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # Commands and files

    def run(
        self,
        *argv: str,
        check: bool = True,
        input: str | None = None,
        timeout: float = COMMAND_TIMEOUT_S,
        host_network: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        """Run argv inside the container (all its namespaces) and capture its output.

        Args:
            host_network: run in the host's network namespace instead of the container's,
                e.g. for apt-get to reach the package mirror (the container has only a loopback).

        Raises:
            ContainerError: check is true and the command exited non-zero.
        """
        if not self.leader:
            raise ContainerError(f"container {self.name} is not running")
        env_args = [f"{k}={v}" for k, v in GUEST_ENV.items()]
        if host_network:  # every namespace but the network's, which is given explicitly
            namespaces = ["-m", "-u", "-i", "-p", "-C", f"--net=/proc/self/fd/{_HOST_NETNS_FD}"]
        else:
            namespaces = ["-a"]
        result = subprocess.run(
            ["nsenter", "-t", str(self.leader), *namespaces, "env", "-i", *env_args, *argv],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            pass_fds=(_HOST_NETNS_FD,) if host_network else (),
        )
        if check and result.returncode != 0:
            raise ContainerError(
                f"{' '.join(argv)} exited {result.returncode} in {self.name}\n"
                f"stdout: {result.stdout}\nstderr: {result.stderr}"
            )
        return result

    @contextlib.contextmanager
    def network(self) -> Iterator[None]:
        """Within the block, sockets this thread creates live in the container's network.

        A socket keeps its namespace once created: it can be used after the block too.
        """
        if not self.leader:
            raise ContainerError(f"container {self.name} is not running")
        with open("/proc/thread-self/ns/net", "rb") as own:
            with open(f"/proc/{self.leader}/ns/net", "rb") as theirs:
                _setns(theirs.fileno())
            try:
                yield
            finally:
                _setns(own.fileno())

    def sh(self, script: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a shell script inside the container."""
        return self.run("sh", "-c", script, check=check)

    def write_file(self, path: str, text: str, mode: int = 0o644) -> None:
        """Create or replace a file in the container (parents are created)."""
        parent = os.path.dirname(path)
        self.run(
            "sh", "-c", 'mkdir -p "$1" && cat > "$2" && chmod "$3" "$2"', "sh", parent, path,
            f"{mode:o}", input=text,
        )  # fmt: skip

    def copy_in(self, host_path: str | Path, guest_path: str, mode: int | None = None) -> None:
        """Copy a host file (binary-safe) into the container."""
        host_path = Path(host_path)
        mode = host_path.stat().st_mode & 0o7777 if mode is None else mode
        with open(host_path, "rb") as source:
            subprocess.run(
                ["nsenter", "-t", str(self.leader), "-a", "sh", "-c",
                 'mkdir -p "$(dirname "$1")" && cat > "$1" && chmod "$2" "$1"', "sh",
                 guest_path, f"{mode:o}"],
                stdin=source, check=True, timeout=COMMAND_TIMEOUT_S, capture_output=True,
            )  # fmt: skip

    def read_file(self, path: str) -> str:
        """The text of a file in the container."""
        return self.run("cat", path).stdout

    # systemd helpers

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run systemctl in the container."""
        return self.run("systemctl", *args, check=check)

    def show(self, unit: str, prop: str) -> str:
        """One property of a unit, e.g. show("epolld", "MainPID")."""
        return self.systemctl("show", "--property", prop, "--value", unit).stdout.strip()

    def wait_for_state(self, unit: str, states: Iterable[str], timeout: float = 30.0) -> str:
        """Poll ActiveState until it is one of states; return it."""
        wanted = set(states)

        def reached() -> str | None:
            state = self.show(unit, "ActiveState")
            return state if state in wanted else None

        return wait_until(
            reached,
            timeout,
            f"{unit} to become {'/'.join(sorted(wanted))}",
        )

    def journal(self, *args: str) -> list[dict[str, Any]]:
        """journalctl -o json entries (all, or filtered by args such as -u UNIT)."""
        out = self.run("journalctl", "--no-pager", "-o", "json", *args).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def journal_cursor(self) -> str:
        """The journal's current cursor, to read only later entries with --after-cursor."""
        out = self.run("journalctl", "--no-pager", "-n", "1", "-o", "json").stdout
        lines = out.splitlines()
        return str(json.loads(lines[-1])["__CURSOR"]) if lines else ""

    def boot_log(self) -> str:
        """What nspawn and the container's console printed so far (for failure messages)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def host_pid(self, pid: int) -> int:
        """The host's PID of the container's process pid (for a host tool such as strace).

        Raises:
            ContainerError: no such process in the container.
        """
        namespace = os.readlink(f"/proc/{self.leader}/ns/pid")
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                status = (entry / "status").read_text()
                if os.readlink(entry / "ns" / "pid") != namespace:
                    continue
            except OSError:
                continue  # gone meanwhile
            nspid = next(
                (ln.split()[1:] for ln in status.splitlines() if ln.startswith("NSpid:")), []
            )
            if nspid and nspid[-1] == str(pid):
                return int(entry.name)
        raise ContainerError(f"no process {pid} in {self.name}")

    # Internals

    def _find_leader(self) -> int | None:
        nspawn = self._nspawn
        if nspawn is None or nspawn.poll() is not None:
            raise ContainerError(
                f"systemd-nspawn exited early ({nspawn and nspawn.returncode}):\n" + self.boot_log()
            )
        for children in Path(f"/proc/{nspawn.pid}/task").glob("*/children"):
            for pid in children.read_text().split():
                if _comm(int(pid)) == "systemd":
                    return int(pid)
        return None

    def _booted(self) -> str | None:
        # Right after PID 1 appears, is-system-running can print nothing: not listening yet.
        result = self.run("systemctl", "is-system-running", "--wait", check=False, timeout=30)
        state = result.stdout.strip()
        return state if state in ("running", "degraded") else None

    def _make_cgroups(self) -> None:
        for hierarchy in CGROUP_HIERARCHIES:
            os.makedirs(f"/sys/fs/cgroup/{hierarchy}/{self.name}", exist_ok=True)


def _setns(fd: int) -> None:
    """Move the calling thread into the network namespace fd refers to (needs CAP_SYS_ADMIN)."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns: {os.strerror(errno)}")


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _remove_cgroups(name: str, timeout: float = 10.0) -> None:
    """Remove a container's cgroup trees, deepest first (they empty as processes exit)."""

    def removed() -> bool:
        for hierarchy in CGROUP_HIERARCHIES:
            top = Path(f"/sys/fs/cgroup/{hierarchy}/{name}")
            if not top.exists():
                continue
            for directory in sorted(
                (d for d in top.rglob("*") if d.is_dir()), key=lambda d: len(d.parts), reverse=True
            ):
                _try_rmdir(directory)
            _try_rmdir(top)
        return not any(Path(f"/sys/fs/cgroup/{h}/{name}").exists() for h in CGROUP_HIERARCHIES)

    wait_until(removed, timeout, f"cgroups of {name} to be removable")


def _try_rmdir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not empty yet (EBUSY) or already gone
        path.rmdir()


def _remove_stale_cgroups() -> None:
    """Remove cgroups left by a test run that died without powering its container off."""
    pattern = re.compile(rf"{NAME_PREFIX}-(\d+)-\d+$")
    for hierarchy in CGROUP_HIERARCHIES:
        base = Path(f"/sys/fs/cgroup/{hierarchy}")
        for top in base.glob(f"{NAME_PREFIX}-*"):
            match = pattern.match(top.name)
            if match and not Path(f"/proc/{match.group(1)}").exists():
                with contextlib.suppress(TimeoutError):  # still in use: not ours to end
                    _remove_cgroups(top.name, timeout=1.0)


def _run_host(argv: list[str], timeout: float = 600.0) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise ContainerError(
            f"{' '.join(argv)} exited {result.returncode}\n{result.stdout}{result.stderr}"
        )
