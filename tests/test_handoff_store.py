"""The restart handoff through systemd's file descriptor store, with leftovers in it
(issue 20): the test plays systemd, a real AF_UNIX datagram socket as NOTIFY_SOCKET that
keeps what FDSTORE=1 stores and passes it to the next process as LISTEN_FDS, newest
first, as systemd 252 does.

A process killed while storing leaves part of a transport behind: the next process must
take its own handoff, never the leftovers, remove every leftover name (FDSTOREREMOVE) and
still listen.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from epolld import handoff
from tests.epolld_process import WAIT_S, Daemon, write_config
from tests.traffic import connect, recv_exactly

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
RELEASE = "72c99cf"  # the release before generations: names without one
# Puts the passed descriptors at fds 3, 4, ... and LISTEN_PID to the PID exec keeps, as
# systemd does between fork and exec (bash: dash only redirects fds 0-9).
LAUNCHER = 'export LISTEN_PID=$$; exec "$@" {redirections}'


class FakeSystemd:
    """NOTIFY_SOCKET's receiving end with a file descriptor store, as PID 1 keeps it."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.store: list[tuple[str, int]] = []  # newest first
        self.removed: list[str] = []
        self.messages: list[dict[str, str]] = []
        self._cond = threading.Condition()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        space = socket.CMSG_SPACE(handoff.SCM_MAX_FD * 4)
        while not self._done.is_set():
            try:
                data, cmsgs, _, _ = self.sock.recvmsg(65536, space)
            except TimeoutError:
                continue
            except OSError:
                return
            fds = array.array("i")
            for level, kind, payload in cmsgs:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self._cond:
                if fields.get("FDSTORE") == "1" and len(fds) == 1:
                    self.store.insert(0, (fields["FDNAME"], fds[0]))
                    fds = array.array("i")
                elif fields.get("FDSTOREREMOVE") == "1":
                    name = fields["FDNAME"]
                    self.removed.append(name)
                    for stored_name, fd in self.store:
                        if stored_name == name:
                            os.close(fd)
                    self.store = [(n, fd) for n, fd in self.store if n != name]
                self.messages.append(fields)
                self._cond.notify_all()
            for fd in fds:  # BARRIER=1's pipe: closing it is the acknowledgement
                os.close(fd)

    def wait_for(self, key: str, value: str) -> dict[str, str]:
        with self._cond:
            found = self._cond.wait_for(
                lambda: next((m for m in self.messages if m.get(key) == value), None), WAIT_S
            )
        assert found is not None, f"no {key}={value} in {self.messages}"
        return found

    def wait_removed(self, names: set[str]) -> None:
        with self._cond:
            done = self._cond.wait_for(lambda: names <= set(self.removed), WAIT_S)
        assert done, f"FDSTOREREMOVE missing for {sorted(names - set(self.removed))}"

    def close(self) -> None:
        self._done.set()
        self._thread.join(WAIT_S)
        self.sock.close()
        for _, fd in self.store:
            os.close(fd)
        self.store.clear()


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[FakeSystemd]:
    fake = FakeSystemd(tmp_path / "notify")
    yield fake
    fake.close()


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        daemon.stop()


def _start(
    config_path: Path,
    systemd: FakeSystemd,
    passed: list[tuple[str, int]],
    env: dict[str, str] | None = None,
) -> Daemon:
    """The daemon under NOTIFY_SOCKET, with passed as LISTEN_FDS (as systemd starts it)."""
    more = {**(env or {}), "NOTIFY_SOCKET": systemd.path}
    if not passed:
        return Daemon(config_path, env={**os.environ, **more})
    # Duplicates at 10+ so the shell's redirections never overwrite one another.
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for _, fd in passed]
    redirections = " ".join(f"{3 + i}<&{fd}" for i, fd in enumerate(high))
    more["LISTEN_FDS"] = str(len(passed))
    more["LISTEN_FDNAMES"] = ":".join(name for name, _ in passed)
    try:
        return Daemon(
            config_path,
            env={**os.environ, **more},
            prefix=("bash", "-c", LAUNCHER.format(redirections=redirections), "bash"),
            pass_fds=tuple(high),
        )
    finally:
        for fd in high:
            os.close(fd)


def _port(daemon: Daemon) -> int:
    return int(daemon.wait_for("listening")[0]["address"].rsplit(":", 1)[1])


def _hand_over(daemon: Daemon, systemd: FakeSystemd) -> list[tuple[str, int]]:
    """SIGUSR2 (systemd's RestartKillSignal): the transport goes into the store, the
    process exits 0; returns the store's content."""
    daemon.signal(signal.SIGUSR2)
    assert daemon.wait() == 0
    with systemd._cond:
        return list(systemd.store)


def _stale_pair(names: tuple[str, str], systemd: FakeSystemd, fds: list[int]) -> None:
    """A pair a killed process stored (fds in flight in it, or none: a pair the next
    process drained), older than everything in the store."""
    for a, b in handoff.send_descriptors(fds) if fds else [_empty_pair()]:
        with systemd._cond:
            systemd.store += [(names[0], a.detach()), (names[1], b.detach())]


def _empty_pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def _config(tmp_path: Path, listen: str = "127.0.0.1:0", workers: int = 1) -> Path:
    settings = {"listen": [listen], "workers": workers, "logging": {"level": "info"}}
    return write_config(tmp_path / "epolld.yaml", settings)


def _echoes(sock: socket.socket, line: bytes) -> None:
    sock.sendall(line)
    assert recv_exactly(sock, len(line)) == line


def _takes_over_beside_leftovers(
    tmp_path: Path,
    systemd: FakeSystemd,
    daemons: list[Daemon],
    old_env: dict[str, str] | None,
    workers: int = 1,
) -> list[str]:
    """A handoff with an empty old-name pair stored before it: the next process takes over
    every connection, serves new ones, and removes every name. Returns the names the
    first process stored."""
    config_path = _config(tmp_path, workers=workers)
    first = _start(config_path, systemd, [], old_env)
    daemons.append(first)
    port = _port(first)
    clients = [connect(port) for _ in range(5)]
    try:
        for sock in clients:
            _echoes(sock, b"before\n")
        _stale_pair(handoff.pair_names(0), systemd, [])  # stored earlier: older
        stored = _hand_over(first, systemd)
        names = [name for name, _ in stored]
        second = _start(config_path, systemd, stored)
        daemons.append(second)
        # With workers, each logs its own (with "worker") besides the supervisor's.
        logged = second.wait_for("handoff_complete", count=1 + workers if workers > 1 else 1)
        complete = next(e for e in logged if "worker" not in e)
        assert complete["connections"] == len(clients)
        for sock in clients:
            _echoes(sock, b"after\n")
        with connect(port) as fresh:
            _echoes(fresh, b"new\n")
        systemd.wait_removed(set(names))
        with systemd._cond:
            assert systemd.store == []
        return names
    finally:
        for sock in clients:
            sock.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_complete_handoff_wins_over_stale_old_name_pairs(
    tmp_path: Path, systemd: FakeSystemd, daemons: list[Daemon], workers: int
) -> None:
    """Stale pairs named as the release before generations named them, beside a complete
    handoff: the handoff is taken over (every connection echoes), the stale pairs are
    removed from the store, and the transport's names carry a generation."""
    # PYTHONSAFEPATH: else `-m` puts the working directory (this checkout) first.
    names = _takes_over_beside_leftovers(tmp_path, systemd, daemons, None, workers)
    stale = set(handoff.pair_names(0))
    generations = {name.split("-")[2] for name in names if name not in stale}
    assert len(generations) == 1
    assert all(len(g) == 8 for g in generations)
    assert stale <= set(names)  # the stale pair, stored too


def test_state_from_the_release_without_generations_is_still_read(
    tmp_path: Path, systemd: FakeSystemd, daemons: list[Daemon]
) -> None:
    """A handoff stored by the release before generations (its names, and a stale pair
    of the same names beside it) is taken over by this one: every connection echoes."""
    old = tmp_path / "release"
    old.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", RELEASE, "epolld"],
        capture_output=True,
        check=True,
        timeout=WAIT_S,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True, timeout=WAIT_S)
    names = _takes_over_beside_leftovers(
        tmp_path, systemd, daemons, {"PYTHONPATH": str(old), "PYTHONSAFEPATH": "1"}
    )
    assert handoff.STATE_NAME in names  # the release's own names: not this code's


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("generation", ["", "0badf00d"], ids=["release-names", "generation"])
def test_pairs_without_a_state_are_removed_and_the_address_bound(
    tmp_path: Path, systemd: FakeSystemd, daemons: list[Daemon], generation: str, workers: int
) -> None:
    """A process killed after storing its pairs but before its state: the next one
    closes what was in flight (the client gets its FIN, the listener its address back),
    removes both names from the store, binds the address afresh and reports READY."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        client = connect(port)
        accepted, _ = listener.accept()
        with accepted:
            prefix = f"epolld-handoff-{generation}-" if generation else "epolld-handoff-"
            names = (f"{prefix}pair0-a", f"{prefix}pair0-b")
            _stale_pair(names, systemd, [listener.fileno(), accepted.fileno()])
    with client:
        with systemd._cond:
            passed = list(systemd.store)
        daemon = _start(_config(tmp_path, f"127.0.0.1:{port}", workers), systemd, passed)
        daemons.append(daemon)
        systemd.wait_for("READY", "1")
        systemd.wait_removed(set(names))
        removed = daemon.wait_for("handoff_leftovers_removed")[0]
        assert removed["closed"] == 2
        with contextlib.suppress(ConnectionResetError):
            assert client.recv(10) == b""  # a FIN (or a reset), not silence
    assert _port(daemon) == port
    with connect(port) as fresh:
        _echoes(fresh, b"served\n")
    with systemd._cond:
        assert systemd.store == []


@pytest.mark.parametrize("held", [False, True], ids=["address-free", "address-held"])
def test_takeover_without_its_listeners_binds_them_or_fails_loudly(
    tmp_path: Path, systemd: FakeSystemd, daemons: list[Daemon], held: bool
) -> None:
    """A complete handoff whose pairs were emptied (a process that took them died): the
    next process binds the address afresh and serves; if something else still holds the
    address, it exits 69 without READY=1 rather than run without a listener."""
    config_path = _config(tmp_path)
    first = _start(config_path, systemd, [])
    daemons.append(first)
    port = _port(first)
    _config(tmp_path, f"127.0.0.1:{port}")  # the next process binds this very port
    stored = _hand_over(first, systemd)
    receiving = [fd for name, fd in stored if name.endswith("-b")]
    drained = handoff.receive_descriptors(receiving)  # as a process that died with them
    kept: list[socket.socket] = []
    for fd in drained.values():
        sock = socket.socket(fileno=fd)
        if held and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            kept.append(sock)  # still listening on the address
        else:
            sock.close()
    try:
        with systemd._cond:
            before = len(systemd.messages)
        second = _start(config_path, systemd, stored)
        daemons.append(second)
        if held:
            assert second.wait() == os.EX_UNAVAILABLE
            assert "no listener" in (second.proc.stderr.read() if second.proc.stderr else "")
            with systemd._cond:
                assert not any(m.get("READY") == "1" for m in systemd.messages[before:])
        else:
            systemd.wait_for("READY", "1")
            second.wait_for("handoff_complete")
            with connect(port) as fresh:
                _echoes(fresh, b"bound afresh\n")
        systemd.wait_removed({name for name, _ in stored})
    finally:
        for sock in kept:
            sock.close()
