"""Scenario 2, the other side: the NEW process of a restart SIGKILLed while it restores.

systemd starts the next process itself, so nothing can be attached before it exists: a
watcher on the host sees it appear among the children of the container's PID 1 (in the
service's cgroup, once it has executed epolld rather than systemd's forked copy) and attaches
strace, which makes the process's Nth recvmsg or sendmsg its last. The interpreter's start-up
leaves ample time: the first recvmsg of a restore comes after every import. The points:

- recvmsg 1..4: before the first batch of descriptors it reads from the handoff's pair,
  between the batches, after the last (the descriptors a killed process received die with
  it, what is still in flight stays in the pair that systemd keeps);
- sendmsg 1..2: after restoring every record, before and between the FDSTOREREMOVE
  messages that clear the transport from the store (all still before READY=1).

With workers: 2 the process systemd starts is the supervisor, killed at the points of
KILL_SUPERVISOR_AT: before and after the one batch it reads (it carries each worker's
transport, so a supervisor that received it takes its workers' clients down with it: they
must be closed, not hung), between its FDSTOREREMOVEs, and after it forked the workers.

Afterwards systemd must run the service again (Restart=on-failure), every client either
echoes or was closed (FIN or RST: none left open without an answer), the store is empty,
and the successor recovered exactly the connections still in flight when the killed
process died: the store kept the state and every pair it lists, so it must.
"""

from __future__ import annotations

import contextlib
import re
import struct
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tests.chaos.kills import (
    CLIENTS,
    CONFIG,
    PORT,
    WAIT_S,
    answers_after,
    connected_clients,
    note_unreachable,
    wait_served_again,
)
from tests.chaos.netns import REPO
from tests.chaos.outcome import Row
from tests.chaos.packaged import PackagedService, missing_privileges, wait_until

# (syscall, N): the process dies entering its Nth call of that kind.
KILL_AT = (("recvmsg", 1), ("recvmsg", 2), ("recvmsg", 3), ("recvmsg", 4), ("sendmsg", 1),
           ("sendmsg", 2))  # fmt: skip
# The new supervisor (workers: 2, 300 clients; strace of a restart): recvmsg 1 reads its one
# batch (the listeners and each worker's transport, whose pairs hold that worker's clients),
# recvmsg 2-3 find the pairs empty, sendmsg 1-3 are the FDSTOREREMOVEs, and recvmsg 4 is the
# first message of a worker it forked, which has restored its clients by then. Kill before
# the batch, after it, between the removals, and once the workers run.
KILL_SUPERVISOR_AT = (("recvmsg", 1), ("recvmsg", 2), ("sendmsg", 2), ("recvmsg", 4))
LISTENERS = 1  # the descriptors in flight are the listener's and the clients'
POLL_S = 0.001
JOURNAL_WAIT_S = 15.0
EXECUTABLE = b"/usr/bin/epolld"  # the packaged unit's ExecStart
# A batch's header as the pair carries it (epolld/handoff.py BATCH: first index, count),
# as strace -xx prints a returned recvmsg's data.
_BATCH = re.compile(r'recvmsg\(.*iov_base="((?:\\x[0-9a-f]{2}){8})".* = 8$')


@dataclass
class Kill:
    """What the watcher saw: the process it traced and what strace printed about it."""

    pid: int = 0  # on the host
    guest_pid: int = 0  # in the container
    output: str = ""

    @property
    def killed(self) -> bool:
        return "+++ killed by SIGKILL" in self.output

    def received(self) -> int:
        """Descriptors the killed process took out of the pair before it died."""
        total = 0
        for line in self.output.splitlines():
            match = _BATCH.search(line)
            if match:
                raw = bytes(int(h, 16) for h in match.group(1).split("\\x")[1:])
                total += struct.unpack("<II", raw)[1]
        return total


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            found.update(int(p) for p in children.read_text().split())
    return found


def _is_new_epolld(pid: int) -> bool:
    """In the service's cgroup and executing epolld (systemd's forked copy is in the cgroup
    before it executes the command, and then runs systemd's code)."""
    try:
        in_unit = "/epolld.service" in Path(f"/proc/{pid}/cgroup").read_text()
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return in_unit and EXECUTABLE in argv


def _watch_and_kill(
    leader: int, before: set[int], syscall: str, when: int, out: Path, kill: Kill
) -> None:
    """Attach strace to the first new epolld process PID 1 starts; it dies entering its
    when-th syscall, which fails without running."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        pid = next((p for p in _children(leader) - before if _is_new_epolld(p)), 0)
        if not pid:
            time.sleep(POLL_S)
            continue
        kill.pid, kill.guest_pid = pid, _guest_pid(pid)
        tracer = subprocess.Popen(
            [
                "strace", "-q", "-o", str(out), "-s", "8", "-xx", "-p", str(pid),
                "-e", "trace=recvmsg,sendmsg",
                "-e", f"inject={syscall}:error=EAGAIN:signal=SIGKILL:when={when}",
            ],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            _, err = tracer.communicate(timeout=WAIT_S)
        except subprocess.TimeoutExpired:  # it never made that call: detach
            tracer.terminate()
            _, err = tracer.communicate()
        with contextlib.suppress(OSError):
            kill.output = out.read_text()
        kill.output += err.decode(errors="replace")
        return


def _guest_pid(pid: int) -> int:
    """A host process's PID in the container's namespace (0: gone)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    return 0


def _successor_recovered(
    service: PackagedService, cursor: str, expected: bool, workers: int
) -> tuple[int, int]:
    """Connections and listeners the process after the kill took over (its
    handoff_complete line, the supervisor's with workers; when one is expected, waited
    for: journald may be behind on a busy machine)."""

    def entries() -> list[dict[str, str]] | None:
        # Filtered here: journalctl's -u with a field match and --after-cursor missed it.
        found = [
            e
            for e in service.c.journal("-u", "epolld", "--after-cursor", cursor)
            if e.get("EPOLLD_EVENT") == "handoff_complete"
            and (workers == 1 or "EPOLLD_WORKERS" in e)
        ]
        return found or None

    try:
        found = wait_until(entries, JOURNAL_WAIT_S if expected else 0.0, "handoff_complete")
    except TimeoutError:
        return 0, 0
    last = found[-1]
    return int(last.get("EPOLLD_CONNECTIONS", 0)), int(last.get("EPOLLD_LISTENERS", 0))


def _one_kill(
    service: PackagedService, workers: int, syscall: str, when: int, tmp: Path, row: Row
) -> dict[str, int]:
    clients = connected_clients(service)
    try:
        old = service.main_pid()
        service.c.systemctl("reset-failed", "epolld", check=False)  # a start limit of its own
        cursor = service.c.journal_cursor()
        kill = Kill()
        watcher = threading.Thread(
            target=_watch_and_kill,
            args=(
                service.c.leader,
                _children(service.c.leader),
                syscall,
                when,
                tmp / f"strace-{syscall}-{when}",
                kill,
            ),
        )
        watcher.start()
        service.c.systemctl("restart", "epolld", check=False)  # fails: its start is killed
        watcher.join(WAIT_S * 3)
        killed = "the new supervisor" if workers > 1 else "the new process"
        where = f"{killed} killed at {syscall} {when}"
        row.require(kill.killed, f"{where}: it was not killed (strace: {kill.output[-300:]!r})")
        wait_served_again(service, {old, str(kill.guest_pid)}, where, row)
        answers = answers_after(service, clients, where, row)
        received = kill.received()
        answers["received"] = received
        if workers == 1:
            # Everything still in flight must come back: the clients as connections and,
            # if the killed process had not received it yet, the listener (whether it came
            # before or after the clients depends on the transport's order of pairs).
            in_flight = CLIENTS + LISTENERS - received
            taken, listeners = _successor_recovered(service, cursor, in_flight > 0, workers)
            where += f" after receiving {received} of {CLIENTS + LISTENERS} descriptors"
            row.require(
                answers["echo"] == taken and taken + listeners == in_flight,
                f"{where}: {in_flight} descriptors were still in flight, the next process"
                f" took over {taken} connections and {listeners} listeners, and"
                f" {answers['echo']} still echo",
            )
        else:
            # A supervisor's descriptors carry the workers' transports (pairs that hold
            # their connections): killed before it read any, the store still holds every
            # connection and the next supervisor must take all of them over; killed later,
            # those it held died with it (closed), and the next one takes over the rest.
            taken, _ = _successor_recovered(service, cursor, received == 0, workers)
            where += f" after receiving {received} descriptors"
            row.require(
                answers["echo"] == taken and (received > 0 or taken == CLIENTS),
                f"{where}: the next supervisor took over {taken} connections of {CLIENTS}"
                f" and {answers['echo']} still echo",
            )
        answers["taken_over"] = taken
        return answers
    finally:
        for sock in clients:
            sock.close()


def kills_while_restoring(
    seconds: float,
    seed: int,
    package: Path | None = None,
    points: tuple[tuple[str, int], ...] = KILL_AT,
    supervisor_points: tuple[tuple[str, int], ...] = KILL_SUPERVISOR_AT,
) -> Row:
    """Each kill point with one process, and each supervisor point with workers: 2 (seconds
    is not used: the scenario is as long as its kill points take)."""
    row = Row("2. kills of the new process while it restores")
    reason = missing_privileges()
    if reason:
        row.failures.append(f"cannot run: {reason}")
        return row
    subprocess.run(
        ["sh", "-c", "command -v strace || packaging/dev/apt-install strace"],
        check=True, capture_output=True, cwd=REPO,
    )  # fmt: skip
    kills = recovered = closed = configured = 0
    figures: list[str] = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        PackagedService(Path(tmp), f"epolld-chaos-restore-{seed}", package=package) as service,
    ):
        for workers, syscall, when in [
            *((1, s, n) for s, n in points),
            *((2, s, n) for s, n in supervisor_points),
        ]:
            if workers != configured:
                service.configure(CONFIG.format(port=PORT, workers=workers))
                configured = workers
            try:
                answers = _one_kill(service, workers, syscall, when, Path(tmp), row)
            except OSError as e:  # the service is not there to connect to
                note_unreachable(service, f"workers: {workers}, killed at {syscall} {when}", e, row)
                continue
            kills += 1
            recovered += answers["echo"]
            closed += answers["closed"]
            figures.append(
                f"{'supervisor ' if workers > 1 else ''}{syscall} {when}:"
                f" {answers['received']} received, {answers['echo']} recovered"
            )
            time.sleep(0.5)
        row.errors = service.error_entries()
    row.load = f"{CLIENTS} open connections at each of {kills} kills"
    row.faults = (
        "SIGKILL of the process systemd starts for systemctl restart, at its "
        + ", ".join(f"{s} {n}" for s, n in points)
        + " (one process) and of the supervisor it starts with workers: 2, at "
        + ", ".join(f"{s} {n}" for s, n in supervisor_points)
    )
    row.bytes_verified = 13 * (recovered + closed) + 6 * recovered
    row.notes.append(
        f"{recovered:,} connections recovered and {closed:,} closed (FIN or RST), none hung;"
        f" {'; '.join(figures)}"
    )
    return row
