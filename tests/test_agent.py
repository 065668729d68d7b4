"""HAProxy's agent check (agent.listen) and the operator's drain (epolld --drain) on the
real daemon, as a subprocess on loopback (issue 23).

The agent's line is read as HAProxy reads it: connect, read to EOF. The drain command is
the real command line, talking to the daemon over its control socket in tmp_path.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from epolld import config as config_mod
from epolld import control
from epolld.errors import ConfigError, EpolldError
from epolld.observability import agent
from tests.epolld_process import WAIT_S, Daemon, write_config
from tests.traffic import connect, recv_until_eof, roundtrip

pytestmark = pytest.mark.slow

NOBODY = 65534


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        pids = {e["pid"] for e in daemon.events("worker_started")}
        daemon.stop()
        for pid in pids:  # workers: in process groups of their own
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert not daemon.bad_lines, daemon.bad_lines[:5]


def start(tmp_path: Path, daemons: list[Daemon], **settings: Any) -> Daemon:
    config: dict[str, Any] = {
        "listen": ["127.0.0.1:0"],
        "stats_interval": "0s",
        "metrics": {"listen": "127.0.0.1:0"},
        "agent": {"listen": "127.0.0.1:0"},
        "control": {"socket": str(tmp_path / "control.sock")},
        **settings,
    }
    daemon = Daemon(write_config(tmp_path / "epolld.yaml", config))
    daemons.append(daemon)
    daemon.wait_for("workers_ready" if config.get("workers", 1) != 1 else "listening")
    return daemon


def _port(daemon: Daemon, event: str, count: int = 1) -> int:
    return int(daemon.wait_for(event, count=count)[-1]["address"].rsplit(":", 1)[1])


def agent_line(port: int) -> str:
    """What HAProxy's agent check reads: connect, read to EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as sock:
        return recv_until_eof(sock).decode()


def ready_status(port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT_S)
    try:
        conn.request("GET", "/readyz")
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def epolld_cli(
    config_path: Path, *args: str, user: int | None = None
) -> subprocess.CompletedProcess[str]:
    """The command line an operator types, as a real process (as another uid if asked)."""
    return subprocess.run(
        [sys.executable, "-m", "epolld", "--config", str(config_path), *args],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        check=False,
    )


def wait_agent(port: int, wanted: str) -> None:
    deadline = time.monotonic() + WAIT_S
    line = ""
    while time.monotonic() < deadline:
        line = agent_line(port)
        if line == wanted:
            return
        time.sleep(0.05)
    raise AssertionError(f"agent said {line!r}, wanted {wanted!r}")


# --- the line -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("draining", "connections", "capacity", "line"),
    [
        (False, 0, 10, "up ready 100%\n"),
        (False, 3, 10, "up ready 70%\n"),
        (False, 1, 3, "up ready 66%\n"),  # rounded down: never more than is left
        (False, 10, 10, "up ready 1%\n"),  # full: at least 1%, or HAProxy would drain it
        (False, 12, 10, "up ready 1%\n"),
        (True, 0, 10, "drain\n"),
    ],
)
def test_answer(draining: bool, connections: int, capacity: int, line: str) -> None:
    """`up ready N%` with the share of capacity left (at least 1%), `drain` when draining."""
    assert agent.answer(draining, connections, capacity) == line


def test_config_agent_and_control(tmp_path: Path) -> None:
    """agent.listen takes one TCP address; control.socket "auto", a path or null."""
    path = tmp_path / "e.yaml"
    path.write_text('agent: {listen: "127.0.0.1:7082"}\ncontrol: {socket: /run/x.sock}\n')
    config = config_mod.load_config(str(path))
    assert str(config.agent.listen) == "127.0.0.1:7082"
    assert config_mod.control_socket_path(config) == "/run/x.sock"
    default = config_mod.Config()
    assert default.agent.listen is None
    assert config_mod.control_socket_path(default, {}) is None
    runtime = {"RUNTIME_DIRECTORY": "/run/epolld"}
    assert config_mod.control_socket_path(default, runtime) == "/run/epolld/control.sock"
    for text, message in [
        ('agent: {listen: "udp:127.0.0.1:7082"}', "agent.listen: HAProxy's agent check"),
        ('agent: {listen: "unix:/run/a.sock"}', "agent.listen: HAProxy's agent check"),
        ("control: {socket: run/x.sock}", 'control.socket: expected an absolute path, "auto"'),
    ]:
        path.write_text(text + "\n")
        with pytest.raises(ConfigError, match=message):
            config_mod.load_config(str(path))


# --- the daemon ----------------------------------------------------------------------


def test_agent_weight_follows_open_connections(tmp_path: Path, daemons: list[Daemon]) -> None:
    """The weight is the share of max_connections left: 100%, 70% with 3 of 10 open, 1%
    when full, and 100% again once they close."""
    daemon = start(tmp_path, daemons, limits={"max_connections": 10})
    port = _port(daemon, "agent_listening")
    assert agent_line(port) == "up ready 100%\n"
    socks = [connect(daemon.port) for _ in range(3)]
    try:
        for sock in socks:
            roundtrip(sock, b"x")
        assert agent_line(port) == "up ready 70%\n"
        socks += [connect(daemon.port) for _ in range(7)]
        for sock in socks[3:]:
            roundtrip(sock, b"y")
        assert agent_line(port) == "up ready 1%\n"
    finally:
        for sock in socks:
            sock.close()
    wait_agent(port, "up ready 100%\n")


def test_agent_weight_with_workers(tmp_path: Path, daemons: list[Daemon]) -> None:
    """With workers the supervisor answers, over every worker's capacity: 5 of 2 x 10."""
    daemon = start(tmp_path, daemons, workers=2, limits={"max_connections": 10})
    port = _port(daemon, "agent_listening")
    assert agent_line(port) == "up ready 100%\n"
    socks = [connect(daemon.port) for _ in range(5)]
    try:
        for sock in socks:
            roundtrip(sock, b"x")
        wait_agent(port, "up ready 75%\n")  # from the workers' heartbeats
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_agent_says_drain_from_sigterm(tmp_path: Path, daemons: list[Daemon], workers: int) -> None:
    """From SIGTERM the agent says `drain` and /readyz 503 while an open client drains."""
    daemon = start(tmp_path, daemons, workers=workers, shutdown_timeout="30s")
    port = _port(daemon, "agent_listening")
    metrics = _port(daemon, "metrics_listening")
    sock = connect(daemon.port)
    try:
        roundtrip(sock, b"x")
        assert agent_line(port).startswith("up ready ")
        daemon.signal(signal.SIGTERM)
        daemon.wait_for("shutdown_started")
        assert agent_line(port) == "drain\n"
        assert ready_status(metrics) == 503
        assert recv_until_eof(sock) == b""  # its FIN; the daemon waits for ours
        assert agent_line(port) == "drain\n"
    finally:
        sock.close()
    assert daemon.wait() == 0
    with pytest.raises(ConnectionRefusedError):
        agent_line(port)


@pytest.mark.parametrize("workers", [1, 2])
def test_operator_drain_lasts_through_reload_and_restart_until_cancelled(
    tmp_path: Path, daemons: list[Daemon], workers: int
) -> None:
    """epolld --drain: the agent says `drain` and /readyz 503 while the daemon still
    echoes, through SIGHUP and the SIGUSR2 re-exec, until epolld --undrain."""
    daemon = start(tmp_path, daemons, workers=workers)
    config_path = daemon.config_path
    agent_port = _port(daemon, "agent_listening")
    metrics = _port(daemon, "metrics_listening")
    # The next process binds the agent again: on the port this one got.
    settings = yaml.safe_load(config_path.read_text())
    settings["agent"] = {"listen": f"127.0.0.1:{agent_port}"}
    config_path.write_text(yaml.safe_dump(settings))
    sock = connect(daemon.port)
    try:
        drained = epolld_cli(config_path, "--drain")
        assert drained.returncode == 0, drained.stderr
        assert "operator drain: on" in drained.stdout
        assert agent_line(agent_port) == "drain\n"
        assert ready_status(metrics) == 503
        roundtrip(sock, b"still echoing")  # a drain stops no one: the balancer does
        with connect(daemon.port) as newcomer:  # nor does it refuse anyone
            roundtrip(newcomer, b"new")
        daemon.signal(signal.SIGHUP)
        daemon.wait_for("workers_reloaded" if workers > 1 else "config_reloaded")
        assert agent_line(agent_port) == "drain\n"
        daemon.signal(signal.SIGUSR2)
        only_supervisor: dict[str, Any] = {"worker": None}
        daemon.wait_for("handoff_complete", **only_supervisor)
        daemon.wait_for("agent_listening", count=2)
        assert agent_line(agent_port) == "drain\n"
        assert ready_status(metrics) == 503
        status = epolld_cli(config_path, "--drain-status")
        assert "operator drain: on" in status.stdout, status.stdout + status.stderr
        roundtrip(sock, b"across the restart")
        undrained = epolld_cli(config_path, "--undrain")
        assert undrained.returncode == 0, undrained.stderr
        assert "operator drain: off" in undrained.stdout
        assert agent_line(agent_port).startswith("up ready ")
        assert ready_status(metrics) == 200
    finally:
        sock.close()
    assert [e["event"] for e in daemon.events("drain_started")] == ["drain_started"]
    assert len(daemon.events("drain_cancelled")) == 1


def _ask_as(uid: int, path: Path, command: str) -> str:
    """control.ask() from a forked child running as uid: its answer, or the error."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        try:
            os.close(read_end)
            os.setgid(uid)
            os.setuid(uid)
            try:
                result = repr(control.ask(str(path), command))
            except EpolldError as e:
                result = f"error: {e}"
            os.write(write_end, result.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        answer = pipe.read().decode()
    os.waitpid(pid, 0)
    return answer


def test_control_socket_is_for_root_and_the_daemons_user(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """The socket is mode 0600, so another user cannot connect; and were its mode opened,
    the daemon still refuses a client that is neither root nor its own user
    (SO_PEERCRED): the drain stays off."""
    if os.geteuid() != 0:
        pytest.skip("needs root: asks as another user (nobody)")
    public = Path(tempfile.mkdtemp(prefix="epolld-control-"))  # a directory anyone may enter
    try:
        public.chmod(0o755)
        path = public / "control.sock"
        daemon = start(tmp_path, daemons, control={"socket": str(path)})
        assert path.stat().st_mode & 0o777 == 0o600
        assert "Permission denied" in _ask_as(NOBODY, path, "drain")
        path.chmod(0o666)
        assert "no answer (refused" in _ask_as(NOBODY, path, "drain")
        daemon.wait_for("control_refused", uid=NOBODY)
        status = epolld_cli(daemon.config_path, "--drain-status")
        assert "operator drain: off" in status.stdout, status.stdout + status.stderr
    finally:
        shutil.rmtree(public, ignore_errors=True)


def test_control_socket_of_a_live_daemon_is_not_taken(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """A second daemon on the same control.socket exits 69; a file left by a killed one
    is replaced; a clean stop removes it; without a daemon the command exits 69."""
    first = start(tmp_path, daemons)
    settings = yaml.safe_load(first.config_path.read_text())
    second_path = write_config(tmp_path / "second.yaml", {**settings, "agent": {"listen": None}})
    second = Daemon(second_path)
    daemons.append(second)
    assert second.wait() == 69
    assert "control.socket: cannot listen on unix:" in second.proc.stderr.read()  # type: ignore[union-attr]
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert (tmp_path / "control.sock").exists()  # left behind by the killed daemon
    third = Daemon(second_path)
    daemons.append(third)
    third.wait_for("control_listening")
    assert "operator drain: off" in epolld_cli(second_path, "--drain-status").stdout
    third.signal(signal.SIGTERM)
    assert third.wait() == 0
    assert not (tmp_path / "control.sock").exists()
    missing = epolld_cli(second_path, "--drain")
    assert missing.returncode == 69
    assert "no such socket" in missing.stderr


def test_reload_moves_and_removes_the_agent(tmp_path: Path, daemons: list[Daemon]) -> None:
    """A reload binds a moved agent.listen (the old address then refuses) and closes it
    when set to null; a file that keeps the address keeps the socket."""
    daemon = start(tmp_path, daemons)
    first = _port(daemon, "agent_listening")

    def reload_with(**changes: Any) -> None:
        settings = yaml.safe_load(daemon.config_path.read_text())
        settings.update(changes)
        daemon.config_path.write_text(yaml.safe_dump(settings))
        before = len(daemon.events("config_reloaded"))
        daemon.signal(signal.SIGHUP)
        daemon.wait_for("config_reloaded", count=before + 1)

    reload_with(agent={"listen": f"127.0.0.1:{first}"})
    assert len(daemon.events("agent_listening")) == 1  # the same socket
    assert agent_line(first) == "up ready 100%\n"
    reload_with(agent={"listen": "127.0.0.2:0"})
    moved = daemon.wait_for("agent_listening", count=2)[-1]["address"]
    assert moved.startswith("127.0.0.2:")
    with socket.create_connection(("127.0.0.2", int(moved.rsplit(":", 1)[1])), WAIT_S) as sock:
        assert recv_until_eof(sock) == b"up ready 100%\n"
    with pytest.raises(ConnectionRefusedError):
        agent_line(first)
    reload_with(agent={"listen": None})
    daemon.wait_for("agent_closed", count=2)
    assert len(daemon.events("agent_listening")) == 2


def test_daemon_mode_control_socket_beside_the_pidfile(tmp_path: Path) -> None:
    """epolld --daemon with control.socket beside its pidfile: --drain reaches it, mode
    0600 even under the daemon's umask 0, and the stop removes the socket."""
    control_path = tmp_path / "epolld.control"
    pidfile = tmp_path / "epolld.pid"
    config = {
        "listen": ["127.0.0.1:0"],
        "daemon": {"pidfile": str(pidfile), "log_file": str(tmp_path / "epolld.log")},
        "control": {"socket": str(control_path)},
    }
    config_path = write_config(tmp_path / "epolld.yaml", config)
    started = epolld_cli(config_path, "--daemon")
    assert started.returncode == 0, started.stderr
    deadline = time.monotonic() + WAIT_S
    while not control_path.exists():
        assert time.monotonic() < deadline, "no control socket"
        time.sleep(0.05)
    pid = int(pidfile.read_text())
    try:
        assert control_path.stat().st_mode & 0o777 == 0o600
        drained = epolld_cli(config_path, "--drain")
        assert f"epolld {pid}: draining; operator drain: on" in drained.stdout, drained.stderr
        os.kill(pid, signal.SIGTERM)
        while control_path.exists() or pidfile.exists():
            assert time.monotonic() < deadline + WAIT_S, "the daemon left its files"
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
