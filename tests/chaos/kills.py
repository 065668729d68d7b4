"""Scenario 2: kills in the middle of a handoff, in a real systemd 252.

The old process of a `systemctl restart` is SIGKILLed at each step of storing its transport
in the file descriptor store (strace on the host makes its Nth sendmsg its last: before the
first batch of descriptors, between the pairs, before and after the state memfd), with one
process and with workers (a worker killed at its Nth sendmsg while it hands its transport up
to the supervisor). After each kill systemd must run the service again, every client must
either still echo or have been closed (FIN or RST: none left open without an answer),
nothing stale may stay in the store, and where the store kept the state and every pair it
lists, the connections must have been recovered.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.chaos.netns import REPO
from tests.chaos.outcome import Row
from tests.chaos.packaged import PackagedService, missing_privileges, wait_until

PORT = 7080
CLIENTS = 300
WAIT_S = 30.0
IO_TIMEOUT_S = 10.0
# The old process's sendmsg calls, one process with 300 clients: the listener into pair0,
# the clients into pair1 (two batches of at most 253), FDSTORE of pair0-a, pair0-b,
# pair1-a, pair1-b, the state memfd, then BARRIER=1 (9 calls). Kill at each.
KILL_AT = (1, 2, 3, 4, 5, 6, 7, 8, 9)
CONFIG = """\
listen: ["127.0.0.1:{port}"]
workers: {workers}
shutdown_timeout: 5s
logging: {{connections: false}}
"""


def _kill_at(service: PackagedService, pid: int, sendmsg: int) -> subprocess.Popen[bytes]:
    """strace from the host on pid: its sendmsg-th sendmsg fails and SIGKILL ends it."""
    host_pid = service.c.host_pid(pid)
    tracer = subprocess.Popen(
        [
            "strace", "-qq", "-o", "/dev/null", "-p", str(host_pid), "-e", "trace=sendmsg",
            "-e", f"inject=sendmsg:error=EPIPE:signal=SIGKILL:when={sendmsg}",
        ],
        stdin=subprocess.DEVNULL,
    )  # fmt: skip

    def attached() -> bool:
        status = Path(f"/proc/{host_pid}/status").read_text()
        return any(
            ln.split()[1] != "0" for ln in status.splitlines() if ln.startswith("TracerPid:")
        )

    wait_until(attached, WAIT_S, "strace to attach")
    return tracer


def connected_clients(service: PackagedService) -> list[socket.socket]:
    """CLIENTS connections to the service, each with one line echoed."""
    with service.c.network():
        clients = [
            socket.create_connection(("127.0.0.1", PORT), IO_TIMEOUT_S) for _ in range(CLIENTS)
        ]
    for sock in clients:
        sock.sendall(b"before\n")
        got = b""
        while len(got) < 7:
            got += sock.recv(7 - len(got))
    return clients


def wait_served_again(service: PackagedService, gone: set[str], where: str, row: Row) -> None:
    """Until systemd runs the service again (a MainPID not among gone) with an empty store;
    a failure of row if it does not within WAIT_S."""
    try:
        wait_until(
            lambda: (
                service.c.show("epolld", "ActiveState") == "active"
                and service.main_pid() not in {"0", *gone}
                and service.store_size() == 0
            ),
            WAIT_S,
            "the service to run again with an empty store",
        )
    except TimeoutError:
        row.failures.append(
            f"{where}: not active with an empty store within {WAIT_S:g} s"
            f" (state {service.c.show('epolld', 'ActiveState')},"
            f" store {service.store_size()})"
        )


def answers_after(
    service: PackagedService, clients: list[socket.socket], where: str, row: Row
) -> dict[str, int]:
    """What each client gets for a line now, and whether a new client is served: none may
    hang or get a wrong echo."""
    answers = {"echo": 0, "closed": 0, "hung": 0, "wrong": 0}
    for sock in clients:
        answers[_answer(sock)] += 1
    with service.c.network():
        fresh = socket.create_connection(("127.0.0.1", PORT), IO_TIMEOUT_S)
    answers["new"] = 1 if _answer(fresh) == "echo" else 0
    fresh.close()
    row.require(answers["hung"] == 0, f"{where}: {answers['hung']} clients left hanging")
    row.require(answers["wrong"] == 0, f"{where}: {answers['wrong']} clients got a wrong echo")
    row.require(answers["new"] == 1, f"{where}: a new client was not served")
    return answers


def note_unreachable(service: PackagedService, where: str, error: OSError, row: Row) -> None:
    """After a kill the service could not be connected to: a failure of row with its state
    and the journal's last lines, then a fresh start for the next kill point."""
    journal = service.c.run(
        "journalctl", "--no-pager", "-u", "epolld", "-n", "25", check=False
    ).stdout
    row.failures.append(
        f"{where}, then: {error!r};"
        f" state {service.c.show('epolld', 'ActiveState')}; journal:\n{journal}"
    )
    service.c.systemctl("reset-failed", "epolld", check=False)
    service.c.systemctl("start", "epolld", check=False)


def _answer(sock: socket.socket) -> str:
    """What a client gets for a line now: "echo", "closed" (FIN or RST) or "hung"."""
    sock.settimeout(IO_TIMEOUT_S)
    try:
        sock.sendall(b"after\n")
        got = b""
        while len(got) < 6:
            chunk = sock.recv(6 - len(got))
            if not chunk:
                return "closed"
            got += chunk
    except (ConnectionResetError, BrokenPipeError):
        return "closed"
    except TimeoutError:
        return "hung"
    return "echo" if got == b"after\n" else "wrong"


def _one_kill(service: PackagedService, workers: int, when: int, row: Row) -> dict[str, int]:
    clients = connected_clients(service)
    try:
        main = int(service.main_pid())
        target = main
        if workers > 1:  # a worker, killed while it hands its transport to the supervisor
            children = service.c.sh(f"ps -o pid= --ppid {main}").stdout.split()
            target = int(children[0])
        # Each kill point is an experiment of its own: systemd's start limit (5 starts in
        # 10 s) would otherwise count the previous points' restarts against this one.
        service.c.systemctl("reset-failed", "epolld", check=False)
        tracer = _kill_at(service, target, when)
        service.c.systemctl("restart", "epolld", check=False)  # may end in a SIGKILL
        with contextlib.suppress(subprocess.TimeoutExpired):
            tracer.wait(WAIT_S)
        where = f"{'a worker' if workers > 1 else 'the old process'} killed at sendmsg {when}"
        wait_served_again(service, {str(main)}, where, row)
        answers = answers_after(service, clients, where, row)
        # One process hands over all or nothing; a killed worker's own clients are closed
        # while the other worker's travel.
        row.require(
            workers > 1 or answers["echo"] in (0, CLIENTS),
            f"{where}: {answers['echo']} of {CLIENTS} clients recovered, the rest closed",
        )
        return answers
    finally:
        for sock in clients:
            sock.close()


def kills_mid_handoff(
    seconds: float,
    seed: int,
    package: Path | None = None,
    points: tuple[int, ...] = KILL_AT,
) -> Row:
    """Each kill point with one process and with workers: 2 (seconds is not used: the
    scenario is as long as its kill points take)."""
    row = Row("2. kills in the middle of a handoff")
    reason = missing_privileges()
    if reason:
        row.failures.append(f"cannot run: {reason}")
        return row
    subprocess.run(
        ["sh", "-c", "command -v strace || packaging/dev/apt-install strace"],
        check=True, capture_output=True, cwd=REPO,
    )  # fmt: skip
    kills = recovered = closed = 0
    with (
        tempfile.TemporaryDirectory() as tmp,
        PackagedService(Path(tmp), f"epolld-chaos-kills-{seed}", package=package) as service,
    ):
        for workers in (1, 2):
            service.configure(CONFIG.format(port=PORT, workers=workers))
            for when in points:
                try:
                    answers = _one_kill(service, workers, when, row)
                except OSError as e:  # the service is not there to connect to
                    note_unreachable(
                        service, f"workers: {workers}, killed at sendmsg {when}", e, row
                    )
                    continue
                kills += 1
                recovered += answers["echo"]
                closed += answers["closed"]
                time.sleep(0.5)
        row.errors = service.error_entries()
    row.load = f"{CLIENTS} open connections at each of {kills} kills"
    row.faults = (
        f"SIGKILL at sendmsg {', '.join(map(str, points))} of the old process (one process) and of"
        " a worker (workers: 2) during systemctl restart"
    )
    row.bytes_verified = 13 * (recovered + closed) + 6 * recovered
    row.notes.append(
        f"{recovered:,} connections recovered and {closed:,} closed (FIN or RST), none hung"
    )
    return row
