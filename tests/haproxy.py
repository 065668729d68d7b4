"""A real HAProxy (Debian 12's haproxy 2.6) as a test process on loopback.

HAProxy is installed with packaging/dev/apt-install on first use, which needs root: the
tests that use it skip without root, saying so. It runs in the foreground (-db) in its
own session, with a stats socket in the test's directory for waiting on health checks.

Ports: the frontend listens on a socket the test binds to 127.0.0.1:0 and hands over as
`bind fd@N`, so no port is ever hard-coded or guessed. The connections HAProxy opens to
the backends leave from PROXY_SOURCE (a loopback address of their own), so that the
backends can tell the proxy's address from the clients' (127.0.0.2, 127.0.0.3, ...).
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
APT_INSTALL = REPO / "packaging" / "dev" / "apt-install"
PROXY_SOURCE = "127.0.0.50"  # where HAProxy's connections to the backends come from
WAIT_S = 20.0  # the most any wait on HAProxy may take


def missing_reason() -> str | None:
    """Why the HAProxy tests cannot run here, or None when they can (installing if needed)."""
    if os.geteuid() != 0:
        return "needs root: installs Debian's haproxy package and runs it (run as root)"
    if shutil.which("haproxy") is None:
        subprocess.run([str(APT_INSTALL), "haproxy"], check=True, timeout=600)
    if shutil.which("haproxy") is None:
        return "haproxy is not on PATH after installing the haproxy package"
    return None


@dataclass(frozen=True)
class Backend:
    """One `server` line: an epolld at 127.0.0.1:port, and how HAProxy talks to it."""

    name: str
    port: int
    send_proxy: str = "send-proxy-v2"  # "send-proxy" (v1), "send-proxy-v2" or "" (none)
    # TLS to the server (epolld's `tls: true`), verified against this CA file; the health
    # checks speak TLS too (check-ssl: HAProxy's default for an ssl server, said outright),
    # after their PROXY header.
    ssl_ca: str | None = None
    # HAProxy's agent check on epolld's agent.listen (observability/agent.py), if set.
    agent_port: int | None = None
    # How often a health check runs, its timeout (inter), and how many decide.
    timing: str = "inter 300ms fall 2 rise 1"


def _server_options(b: Backend) -> str:
    options = f" {b.send_proxy}" if b.send_proxy else ""
    if b.ssl_ca is not None:
        options += f" ssl verify required ca-file {b.ssl_ca} verifyhost localhost"
    options += " check"
    if b.send_proxy:
        options += " check-send-proxy"
    if b.ssl_ca is not None:
        options += " check-ssl"
    if b.agent_port is not None:
        # The agent's N% applies to the server's weight: at the default weight 1, 99% is 0.
        options += f" weight 100 agent-check agent-port {b.agent_port} agent-inter 300ms"
    return options


def config_text(backends: list[Backend], frontend_fd: int, state_dir: Path) -> str:
    """The haproxy.cfg of the tests (docs/deploy.md shows the same one with real addresses).

    Health checks: a tcp-check that sends a line and expects its echo, with the PROXY
    header on the check connection too (check-send-proxy), as HAProxy sends it: LOCAL for
    v2, and a header for v1.
    """
    servers = "\n".join(
        f"    server {b.name} 127.0.0.1:{b.port} source {PROXY_SOURCE}{_server_options(b)}"
        f" {b.timing}"
        for b in backends
    )
    return f"""\
global
    nbthread 1
    stats socket {state_dir}/admin.sock mode 600 level admin
    log stderr format short local0 info

defaults
    mode tcp
    log global
    option tcplog
    option dontlognull
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    # a connection that cannot reach its server is retried on another one
    option redispatch
    retries 2

frontend echo
    bind fd@{frontend_fd}
    default_backend epolld

backend epolld
    balance roundrobin
    option tcp-check
    tcp-check send "health-check\\r\\n"
    tcp-check expect string health-check
{servers}
"""


class HAProxy:
    """haproxy -db in its own session, its frontend on a socket bound here."""

    def __init__(self, state_dir: Path, backends: list[Backend]) -> None:
        self.state_dir = state_dir
        self.backends = backends
        self.frontend = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.frontend.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.frontend.bind(("127.0.0.1", 0))
        self.frontend.listen(128)
        self.port: int = self.frontend.getsockname()[1]
        self.config_path = state_dir / "haproxy.cfg"
        self.config_path.write_text(config_text(backends, self.frontend.fileno(), state_dir))
        check = subprocess.run(
            ["haproxy", "-c", "-q", "-f", str(self.config_path)],
            pass_fds=[self.frontend.fileno()],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert check.returncode == 0, check.stdout + check.stderr
        self.log_path = state_dir / "haproxy.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            ["haproxy", "-db", "-f", str(self.config_path)],
            pass_fds=[self.frontend.fileno()],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pid = self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def command(self, line: str) -> str:
        """A command on the stats socket (see HAProxy's management guide), its answer."""
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.settimeout(WAIT_S)
                    sock.connect(str(self.state_dir / "admin.sock"))
                    sock.sendall(line.encode() + b"\n")
                    chunks = []
                    while chunk := sock.recv(65536):
                        chunks.append(chunk)
                    return b"".join(chunks).decode()
            except (FileNotFoundError, ConnectionRefusedError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"HAProxy has no stats socket:\n{self.log()}") from None
                time.sleep(0.05)

    def server_status(self) -> dict[str, str]:
        """Backend server name -> its status in `show stat` (UP, DOWN, UP 1/2, ...)."""
        rows = csv.DictReader(io.StringIO(self.command("show stat").lstrip("# ")))
        return {
            row["svname"]: row["status"]
            for row in rows
            if row["pxname"] == "epolld" and row["svname"] not in ("BACKEND", "FRONTEND")
        }

    def wait_status(self, wanted: dict[str, str]) -> None:
        """Wait until each named server has the wanted status (health checks decide)."""
        deadline = time.monotonic() + WAIT_S
        while True:
            status = self.server_status()
            if all(status.get(name) == want for name, want in wanted.items()):
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"servers {status}, wanted {wanted}; log:\n{self.log()}")
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM (SIGKILL if it lingers) to HAProxy's session, then close what is ours."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(WAIT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait(WAIT_S)
        self.frontend.close()
        self._log.close()
