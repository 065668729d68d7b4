"""Starting and stopping the processes the bench runs, and reading their /proc figures.

Every process runs in a session of its own and is only ever signalled by that process
group, which this module remembers; nothing is looked up by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

SERVER_CPU = 0  # the server under test
CLIENT_CPU = 1  # the load generators (and the runner, which sleeps meanwhile)
# taskset lists (--server-cpus, --client-cpus): more than one core for `workers:` runs on
# a larger machine. SERVER_CPU and CLIENT_CPU are the first of each (watched for foreign load).
SERVER_CPUS = str(SERVER_CPU)
CLIENT_CPUS = str(CLIENT_CPU)
STOP_TIMEOUT_S = 5.0  # SIGTERM to SIGKILL
# Server and client run at a raised priority, so that other work on a shared machine takes
# less of their cores (CFS weight 9,548 against 1,024 for nice 0). With autogroup scheduling
# (kernel.sched_autogroup_enabled=1) the nice value only counts inside a session, so the
# session each of them gets is niced too (/proc/PID/autogroup, sched(7)).
NICE_LEVEL = -10
NICE = ["nice", "-n", str(NICE_LEVEL)]
# Background clients (firehoses, holders of idle connections) share the client core with the
# measured client: at nice 0 against its -10, the measured client preempts them when it
# wakes, so that its round trips show the server's delays, not the client core's time slices.
BACKGROUND_NICE_LEVEL = 0

_children: dict[int, subprocess.Popen[bytes]] = {}  # pid -> process, all started by us


def parse_cpus(text: str) -> list[int]:
    """A taskset list ("0", "0-3", "0,2,4-7") as CPU numbers."""
    cpus: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        cpus += range(int(first), int(last or first) + 1)
    return cpus


def use_cpus(server: str, client: str) -> None:
    """Pin servers to the CPUs listed in server, load generators to those in client."""
    global SERVER_CPUS, CLIENT_CPUS, SERVER_CPU, CLIENT_CPU
    SERVER_CPUS, CLIENT_CPUS = server, client
    SERVER_CPU, CLIENT_CPU = parse_cpus(server)[0], parse_cpus(client)[0]


def tree_pids(pid: int) -> list[int]:
    """pid and its children (epolld's workers)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return [pid]
    return [pid, *map(int, text.split())]


def pss_kib(pid: int) -> int | None:
    """Proportional set size: shared pages (a worker's, after fork) counted by share."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def pinned(cpu: int | str, nice: int = NICE_LEVEL) -> list[str]:
    """The prefix that runs a command niced and pinned to a CPU (or a taskset list)."""
    return ["nice", "-n", str(nice), "taskset", "-c", str(cpu)]


def spawn(argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """Start argv in a new session (its own process group) and remember it for cleanup."""
    proc = subprocess.Popen(argv, start_new_session=True, **kwargs)
    _children[proc.pid] = proc
    if argv[:2] == ["nice", "-n"]:  # the session's autogroup gets the same nice value
        with contextlib.suppress(OSError):
            Path(f"/proc/{proc.pid}/autogroup").write_text(argv[2])
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group we started, SIGKILL it if it lingers; reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(STOP_TIMEOUT_S)
    else:  # the leader is gone; its group may not be
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream:
            with contextlib.suppress(OSError):
                stream.close()
    _children.pop(proc.pid, None)


def stop_all() -> None:
    for proc in list(_children.values()):
        stop(proc)


def status_kib(pid: int, key: str) -> int | None:
    """A kB field of /proc/PID/status (VmRSS, VmHWM)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def count_pipes(pid: int) -> int | None:
    """How many of the process's descriptors are pipe ends."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    n = 0
    for fd in fds:
        with contextlib.suppress(OSError):
            n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("pipe:")
    return n


def cpu_jiffies() -> dict[str, list[int]]:
    """Per-CPU jiffies from /proc/stat: total and idle+iowait."""
    rows = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            f = [int(x) for x in line.split()[1:]]
            rows[line.split()[0]] = [sum(f), f[3] + f[4]]
    return rows


def listen_drops() -> int | None:
    """TcpExt ListenDrops from /proc/net/netstat: SYNs and handshakes a full accept queue
    dropped (this network namespace, every listener). A dropped SYN is retried after 1 s,
    which shows as steps of a second in the time to establish many connections."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        lines = Path("/proc/net/netstat").read_text().splitlines()
        for names, values in zip(lines[::2], lines[1::2], strict=False):
            if names.startswith("TcpExt:"):
                return int(values.split()[names.split().index("ListenDrops")])
    return None


def tcp_listening(port: int) -> bool:
    """Whether a socket of this network namespace listens on 127.0.0.1:port (or any address):
    asked of /proc/net/tcp, so that a forking server does not fork for a probe."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, _, hexport = local.partition(":")
            if state == "0A" and int(hexport, 16) == port and addr in ("0100007F", "00000000"):
                return True
    return False
