"""Socket activation: a real child process adopts listening sockets passed as fds 3, 4, ..."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from epolld.errors import BindError
from epolld.listening import activation
from tests import tls_support as tls
from tests.epolld_process import Daemon, write_config

WAIT_S = 10.0

# The child reports what it adopted, then accepts one connection on each socket and answers
# with its name: proof that it holds the live listener, not a copy of the address.
CHILD = r"""
import json, os, sys
import structlog
structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))  # stdout: report
from epolld.listening import activation
from epolld.listening import sockets as listeners
from epolld.errors import BindError
try:
    adopted = activation.inherited_sockets()
except BindError as e:
    print(json.dumps({"error": str(e), "fd3_open": os.path.exists("/proc/self/fd/3")}), flush=True)
    sys.exit(69)
print(json.dumps({
    "sockets": [
        {"name": n, "fd": s.fileno(), "address": listeners.describe_socket(s),
         "blocking": s.getblocking(), "inheritable": s.get_inheritable()}
        for n, s in adopted
    ],
    "env": sorted(k for k in os.environ if k.startswith("LISTEN_")),
}), flush=True)
for name, s in adopted:
    s.settimeout(10)
    conn, _ = s.accept()
    conn.sendall(name.encode())
    conn.close()
    s.close()
"""

# Puts the passed sockets at fds 3, 4, ... and sets LISTEN_PID to the PID that exec keeps, as
# systemd does between fork and exec. bash, not sh: dash only redirects fds 0-9.
LAUNCHER = 'export LISTEN_PID=$$; exec "$0" -c "$1" {redirections}'


def run_child(
    sockets: list[socket.socket], env: dict[str, str]
) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """Start CHILD with sockets at fds 3.. and env; return it with its JSON report."""
    # Duplicates at 10+ so the shell's redirections never overwrite one another.
    high = [fcntl.fcntl(s.fileno(), fcntl.F_DUPFD_CLOEXEC, 10) for s in sockets]
    redirections = " ".join(f"{3 + i}<&{fd}" for i, fd in enumerate(high))
    try:
        child = subprocess.Popen(
            ["bash", "-c", LAUNCHER.format(redirections=redirections), sys.executable, CHILD],
            env={**os.environ, **env},
            pass_fds=high,
            stdout=subprocess.PIPE,
            text=True,
        )
    finally:
        for fd in high:
            os.close(fd)
    assert child.stdout is not None
    try:
        return child, json.loads(child.stdout.readline())
    except BaseException:
        child.kill()
        finish(child)
        raise


def finish(child: subprocess.Popen[str]) -> int:
    try:
        return child.wait(timeout=WAIT_S)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        assert child.stdout is not None
        child.stdout.close()


def ask(family: socket.AddressFamily, address: Any) -> bytes:
    with socket.socket(family, socket.SOCK_STREAM) as client:
        client.settimeout(WAIT_S)
        client.connect(address)
        return client.recv(100)


@pytest.fixture
def tcp_listeners() -> Iterator[list[socket.socket]]:
    v4 = socket.create_server(("127.0.0.1", 0))
    v6 = socket.create_server(("::1", 0), family=socket.AF_INET6)
    yield [v4, v6]
    v4.close()
    v6.close()


def test_adopts_tcp_sockets_with_names(tcp_listeners: list[socket.socket]) -> None:
    """Passed TCP listeners are adopted in order with their names, non-blocking and CLOEXEC."""
    v4, v6 = tcp_listeners
    env = {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "public:admin"}
    child, report = run_child(tcp_listeners, env)
    v4_port, v6_port = v4.getsockname()[1], v6.getsockname()[1]
    assert report["sockets"] == [
        {"name": "public", "fd": 3, "address": f"127.0.0.1:{v4_port}", "blocking": False,
         "inheritable": False},
        {"name": "admin", "fd": 4, "address": f"[::1]:{v6_port}", "blocking": False,
         "inheritable": False},
    ]  # fmt: skip
    assert report["env"] == [], "LISTEN_* must be removed for children"
    assert ask(socket.AF_INET, ("127.0.0.1", v4_port)) == b"public"
    assert ask(socket.AF_INET6, ("::1", v6_port)) == b"admin"
    assert finish(child) == 0


@pytest.mark.parametrize("names", [None, "", "only-one", "a:b:c"])
def test_missing_or_mismatched_names_are_unknown(
    tcp_listeners: list[socket.socket], names: str | None
) -> None:
    """Without one LISTEN_FDNAMES entry per fd, every socket is named "unknown"."""
    env = {"LISTEN_FDS": "2"}
    if names is not None:
        env["LISTEN_FDNAMES"] = names
    child, report = run_child(tcp_listeners, env)
    assert [s["name"] for s in report["sockets"]] == ["unknown", "unknown"]
    for listener in tcp_listeners:
        ask(listener.family, listener.getsockname()[:2])
    assert finish(child) == 0


def test_connected_datagram_socket_is_refused() -> None:
    """A passed datagram socket connected to one peer cannot serve UDP echo: a BindError."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.connect(("127.0.0.1", 9))
        child, report = run_child([udp], {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "udp"})
    assert finish(child) == 69
    assert report["error"] == (
        "inherited fd 3 (udp): neither a listening stream socket nor a UDP socket"
    )
    assert report["fd3_open"], "a refused fd is left as systemd passed it"


def test_connected_socket_is_refused() -> None:
    """A connected (non-listening) stream socket passed by mistake is refused."""
    left, right = socket.socketpair()
    with left, right:
        child, report = run_child([left], {"LISTEN_FDS": "1"})
    assert finish(child) == 69
    assert "neither a listening stream socket nor a UDP socket" in report["error"]


def test_systemd_socket_activate_hands_over_a_unix_socket(tmp_path: Path) -> None:
    """Under systemd-socket-activate, the first connection starts the child, which serves it."""
    tool = shutil.which("systemd-socket-activate")
    assert tool, "systemd-socket-activate (package systemd) is missing"
    path = str(tmp_path / "echo.sock")
    activator = subprocess.Popen(
        [tool, "-l", path, "--fdname=epolld", sys.executable, "-c", CHILD],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert activator.stderr is not None
        assert activator.stderr.readline().startswith("Listening on"), "activator did not listen"
        # This connection waits in the backlog until the exec'd child adopts and accepts it.
        assert ask(socket.AF_UNIX, path) == b"epolld"
        assert activator.stdout is not None
        report = json.loads(activator.stdout.readline())
        assert report["sockets"] == [
            {"name": "epolld", "fd": 3, "address": f"unix:{path}", "blocking": False,
             "inheritable": False},
        ]  # fmt: skip
        assert activator.wait(timeout=WAIT_S) == 0
    finally:
        if activator.poll() is None:
            activator.kill()
            activator.wait()
        for stream in (activator.stdout, activator.stderr):
            if stream is not None:
                stream.close()


def test_listen_pid_of_another_process_is_ignored() -> None:
    """LISTEN_* meant for another PID adopts nothing but is still removed from the environment."""
    environ = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"}
    assert activation.inherited_sockets(environ) == []
    assert environ == {}


def test_no_socket_activation_is_empty() -> None:
    """Without LISTEN_PID/LISTEN_FDS there is nothing to adopt and the environment is kept."""
    environ = {"PATH": "/usr/bin"}
    assert activation.inherited_sockets(environ) == []
    assert environ == {"PATH": "/usr/bin"}


def test_malformed_listen_fds_is_a_bind_error() -> None:
    """A LISTEN_FDS that is not a number is reported, not silently ignored."""
    environ = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "two"}
    with pytest.raises(BindError, match="LISTEN_FDS: expected a number, got 'two'"):
        activation.inherited_sockets(environ)


def test_socket_activated_listener_speaks_tls_when_its_listen_entry_says_so(
    tmp_path: Path,
) -> None:
    """A socket systemd-socket-activate passes is served over TLS when the listen entry
    for its address says `tls`, and its clients get their bytes echoed through TLS."""
    tool = shutil.which("systemd-socket-activate")
    assert tool, "systemd-socket-activate (package systemd) is missing"
    certs = tls.make_certs(tmp_path / "certs")
    path = str(tmp_path / "tls.sock")
    config = write_config(
        tmp_path / "epolld.yaml",
        {
            "listen": [{"address": f"unix:{path}", "tls": True}],
            "tls": {"certificate": str(certs.server.certificate), "key": str(certs.server.key)},
            "logging": {"level": "info", "connections": True},
        },
    )
    daemon = Daemon(config, prefix=(tool, "-l", path, "--fdname=epolld"))
    try:
        deadline = time.monotonic() + WAIT_S
        while not os.path.exists(path):  # the activator binds, then waits for a client
            assert time.monotonic() < deadline, "systemd-socket-activate did not listen"
            time.sleep(0.02)
        # The connection waits in the backlog until the exec'd daemon adopts and accepts it.
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        raw.settimeout(WAIT_S)
        raw.connect(path)
        with tls.client_context(certs=certs).wrap_socket(raw, server_hostname="localhost") as c:
            payload = os.urandom(100_000)
            assert tls.echo_python(c, payload) == payload
        inherited = daemon.wait_for("socket_inherited")
        assert [e["address"] for e in inherited] == [f"unix:{path}"]
        established = daemon.wait_for("tls_established")
        assert established[0]["version"] in ("TLSv1.2", "TLSv1.3")
    finally:
        daemon.stop()
