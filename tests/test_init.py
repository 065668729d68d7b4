"""epolld as PID 1 of a PID namespace, as a container runs it: orphans are reaped, SIGTERM
drains and exits 0, with one process and with workers.

`unshare --pid --fork` makes epolld PID 1 of a new namespace without any container tooling;
`nsenter --pid` then starts a shell inside that leaves a background child and exits, which
orphans the child to PID 1, as a probe's or a `podman exec`'s shell does in a container.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.epolld_process import WAIT_S, Daemon, write_config

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: unshare --pid makes a namespace"),
]

ORPHANS = 5


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _zombies_of(pid: int) -> list[int]:
    """The exited, unreaped children of pid (state Z in /proc/CHILD/stat)."""
    zombies = []
    for child in _children(pid):
        try:
            stat = Path(f"/proc/{child}/stat").read_text()
        except FileNotFoundError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            zombies.append(child)
    return zombies


@pytest.fixture(params=[1, 2], ids=["single", "workers2"])
def init_daemon(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Daemon, int]]:
    """epolld as PID 1 of a new PID namespace; yields the daemon and its PID on the host."""
    assert shutil.which("unshare"), "util-linux provides unshare and nsenter"
    config = write_config(
        tmp_path / "epolld.yaml",
        {"listen": ["127.0.0.1:0"], "workers": request.param, "shutdown_timeout": "5s"},
    )
    daemon = Daemon(config, prefix=("unshare", "--pid", "--fork", "--kill-child"))
    try:
        daemon.wait_for("workers_ready" if request.param > 1 else "listening")
        (epolld,) = _children(daemon.pid)  # unshare's child: PID 1 inside
        yield daemon, epolld
    finally:
        daemon.stop()


def _echo(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as sock:
        sock.sendall(b"ping")
        sock.shutdown(socket.SHUT_WR)
        return sock.recv(100)


def test_pid_1_reaps_the_orphans_it_inherits(init_daemon: tuple[Daemon, int]) -> None:
    """Background children of a shell that exits inside the namespace become PID 1's; once
    they exit, epolld reaps them (no zombie stays), keeps echoing, and SIGTERM exits 0."""
    daemon, epolld = init_daemon
    (nspid,) = [
        ln
        for ln in Path(f"/proc/{epolld}/status").read_text().splitlines()
        if ln.startswith("NSpid:")
    ]
    assert nspid.split()[-1] == "1", nspid  # its PID inside the namespace
    subprocess.run(
        [
            "nsenter",
            f"--target={epolld}",
            "--pid",
            "--",
            "sh",
            "-c",
            f"for i in $(seq {ORPHANS}); do sleep 0.2 & done; exit 0",
        ],
        check=True,
        timeout=WAIT_S,
    )
    deadline = time.monotonic() + WAIT_S
    orphans_seen = False
    while True:  # the sleeps are PID 1's children first, then reaped
        children = _children(epolld)
        zombies = _zombies_of(epolld)
        orphans_seen = orphans_seen or len(children) >= ORPHANS
        if orphans_seen and not zombies and len(children) <= 2:  # at most the workers
            break
        assert time.monotonic() < deadline, f"zombies left under PID 1: {zombies}"
        time.sleep(0.05)
    assert _echo(daemon.port) == b"ping"
    os.kill(epolld, signal.SIGTERM)
    assert daemon.wait() == 0, daemon.tail()
    daemon.wait_for("shutdown_complete")
