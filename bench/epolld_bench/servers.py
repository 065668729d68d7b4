"""The servers under test: one small class per kind, and the table of them (SERVERS).

To add a baseline, add an entry to SERVERS: a PythonServer with a script in bench/servers/
(it must print {"event": "listening", "address": "127.0.0.1:PORT"} once bound), or a new
subclass of Server whose argv() starts it. Then name it in the workloads that should run it
(workloads.CLASSIC is the default matrix).
"""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from . import processes
from .paths import BENCH, BIN, EPOLLD, OUT, ROOT, TLS_CERT, TLS_KEY, VENV_PY, relative
from .workloads import Workload

START_TIMEOUT_S = 15.0  # for a server to print its listening address
BACKLOG = 511


class Unavailable(Exception):
    """The server could not be started (not installed, or it rejected its config)."""


@dataclasses.dataclass(frozen=True)
class Server:
    name: str
    title: str

    io: str = ""  # "splice": the runner checks that it really holds pipes
    tls: bool = False  # serves TLS with bench/out/tls/{cert,key}.pem

    def command(self, workload: Workload) -> list[str]:
        """The server's command line (without the pinning prefix)."""
        raise NotImplementedError

    def argv(self, workload: Workload) -> list[str]:
        return [*processes.pinned(processes.SERVER_CPUS), *self.command(workload)]


@dataclasses.dataclass(frozen=True)
class CServer(Server):
    """bench/echo_server.c: the practical limit of this machine; with processes > 1, that
    many SO_REUSEPORT processes (bench/run --workers N)."""

    processes: int = 1

    def command(self, workload: Workload) -> list[str]:
        argv = [str(BIN / "echo_server"), "--port", "0", "--backlog", str(BACKLOG)]
        return argv + (["--processes", str(self.processes)] if self.processes > 1 else [])


@dataclasses.dataclass(frozen=True)
class CUdpServer(Server):
    """bench/udp_echo_server.c: recvfrom/sendto, or recvmmsg/sendmmsg with mmsg."""

    mmsg: bool = False

    def command(self, workload: Workload) -> list[str]:
        return [str(BIN / "udp_echo_server"), "--port", "0", *(["--mmsg"] if self.mmsg else [])]


@dataclasses.dataclass(frozen=True)
class PythonServer(Server):
    """A script in bench/servers/, run with bench/.venv's Python (uvloop is there)."""

    script: str = ""

    def command(self, workload: Workload) -> list[str]:
        path = BENCH / "servers" / self.script
        tls = ["--cert", str(TLS_CERT), "--key", str(TLS_KEY)] if self.tls else []
        return [str(VENV_PY), str(path), "--port", "0", "--backlog", str(BACKLOG), *tls]


@dataclasses.dataclass(frozen=True)
class GoServer(Server):
    """A Go program from bootstrap.GO_PROGRAMS (bench/servers/go/), with the same options."""

    program: str = ""

    def command(self, workload: Workload) -> list[str]:
        tls = ["--cert", str(TLS_CERT), "--key", str(TLS_KEY)] if self.tls else []
        udp = ["--udp"] if workload.udp else []  # echo_go serves either
        return [str(BIN / self.program), "--port", "0", "--backlog", str(BACKLOG), *tls, *udp]


@dataclasses.dataclass(frozen=True)
class RustServer(GoServer):
    """A cargo package's binary (bootstrap.RUST_PROGRAMS, bench/servers/rust/), the same
    options as the Go servers."""


@dataclasses.dataclass(frozen=True)
class ExternalServer(Server):
    """A packaged tool (socat, ncat) that cannot announce its port: the bench picks a free
    one ({port} in the template; {cert} and {key} are the TLS files) and waits until the
    port is in LISTEN state."""

    template: tuple[str, ...] = ()
    ports: dict[str, int] = dataclasses.field(default_factory=dict)  # the last picked

    def command(self, workload: Workload) -> list[str]:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.ports[workload.name] = probe.getsockname()[1]
        return self.filled(self.ports[workload.name])

    def filled(self, port: int | str) -> list[str]:
        values = {"port": port, "cert": TLS_CERT, "key": TLS_KEY}
        return [arg.format(**values) for arg in self.template]


@dataclasses.dataclass(frozen=True)
class EpolldServer(Server):
    """The worktree's epolld with a generated config: defaults plus the mode and the
    workload's limits."""

    trigger: str = "level"
    workers: int | str = 1  # "auto": one per CPU of --server-cpus

    def config(self, workload: Workload) -> str:
        lines = ['listen: ["127.0.0.1:0"]', f"trigger: {self.trigger}"]
        if workload.tls:
            lines[0] = 'listen: [{address: "127.0.0.1:0", tls: true}]'
            lines.append(f"tls: {{certificate: {TLS_CERT}, key: {TLS_KEY}}}")
        if self.workers != 1:
            lines.append(f"workers: {self.workers}")
        if workload.udp:  # UDP only, its limits off: the C and Python servers have none
            lines[0] = 'listen: ["udp:127.0.0.1:0"]'
            lines.append(UDP_LIMITS_OFF)
        if self.io:
            lines.append(f"io: {self.io}")
        limits = workload.epolld_config()
        if limits:
            lines.append("limits:")
            lines += [f"  {key}: {value}" for key, value in limits.items()]
        return (
            "# Written by bench/run; everything else keeps its default.\n" + "\n".join(lines) + "\n"
        )

    def command(self, workload: Workload) -> list[str]:
        path = OUT / f"{self.name}.{workload.name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.config(workload))
        return [str(EPOLLD), "--config", str(path), "--log-format", "json"]

    def argv(self, workload: Workload) -> list[str]:
        if not EPOLLD.exists():
            raise Unavailable(
                f"{EPOLLD.relative_to(ROOT)} is not installed (make .venv/.installed-stamp)"
            )
        return super().argv(workload)


# issue 24: the UDP rows with the limiter at work. The shipped udp: section (per-source
# buckets of datagrams and bytes, the total bucket, the 8,192-source table, the refused
# ports) with its three rates raised above any bench load: every datagram goes through
# UdpLimiter.admit() and still gets its echo. (With the shipped rates themselves, 100 per
# source and 10,000 in all per second, nearly every datagram of a bench load is dropped,
# and there is no CPU per echo to compare.)
UDP_LIMITS_OFF = "udp: {rate: 0, byte_rate: 0, total_rate: 0}"
UDP_LIMITS_ON = "udp: {rate: 10000000, burst: 10000000, byte_rate: 1GiB, total_rate: 10000000}"


@dataclasses.dataclass(frozen=True)
class EpolldUdpLimitsServer(EpolldServer):
    """epolld over UDP with its rate limits on (UDP_LIMITS_ON), not off as in the other rows."""

    def config(self, workload: Workload) -> str:
        return super().config(workload).replace(UDP_LIMITS_OFF, UDP_LIMITS_ON)


SERVERS: list[Server] = [
    CServer("c-epoll", "C epoll (bench/echo_server.c)"),
    PythonServer("asyncio-protocol", "asyncio Protocol", script="asyncio_protocol.py"),
    PythonServer("asyncio-streams", "asyncio streams", script="asyncio_streams.py"),
    PythonServer("uvloop-protocol", "uvloop Protocol", script="uvloop_protocol.py"),
    EpolldServer("epolld-level", "epolld, trigger: level", trigger="level"),
    EpolldServer("epolld-edge", "epolld, trigger: edge", trigger="edge"),
    EpolldServer("epolld-splice", "epolld, io: splice (level)", io="splice", trigger="level"),
    EpolldServer("epolld-splice-edge", "epolld, io: splice (edge)", io="splice", trigger="edge"),
    EpolldServer("epolld-workers-2", "epolld, workers: 2 (level)", workers=2),
    EpolldServer("epolld-workers-auto", "epolld, workers: auto (level)", workers="auto"),
    CUdpServer("c-udp", "C epoll UDP, recvfrom/sendto (bench/udp_echo_server.c)"),
    CUdpServer("c-udp-mmsg", "C epoll UDP, recvmmsg/sendmmsg (64 per call)", mmsg=True),
    PythonServer("asyncio-datagram", "asyncio DatagramProtocol", script="asyncio_datagram.py"),
    PythonServer("uvloop-datagram", "uvloop DatagramProtocol", script="uvloop_datagram.py"),
    EpolldUdpLimitsServer("epolld-level-udp-limits", "epolld, level, UDP limits on (not limiting)"),
    EpolldUdpLimitsServer(
        "epolld-edge-udp-limits", "epolld, edge, UDP limits on (not limiting)", trigger="edge"
    ),
    # The peers an engineer would pick instead (issue 24), compiled from Debian's packages.
    GoServer("go", "Go net, a goroutine per connection", program="echo_go"),
    RustServer("tokio", "Rust tokio, a task per connection", program="echo_tokio"),
    GoServer("go-tls", "Go crypto/tls, a goroutine per connection", tls=True, program="echo_tls"),
    PythonServer("uvloop-tls", "uvloop Protocol with ssl=", tls=True, script="uvloop_tls.py"),
    ExternalServer(
        "socat-tls",
        "socat OPENSSL-LISTEN,fork (a process per connection)",
        tls=True,
        template=(
            "socat",
            "OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,backlog=511,"
            "cert={cert},key={key},verify=0",
            "PIPE",
        ),
    ),
    ExternalServer(
        "ncat-tls",
        "ncat --ssl -k --exec /bin/cat (a process per connection)",
        tls=True,
        template=(
            *("ncat", "--ssl", "--ssl-cert", "{cert}", "--ssl-key", "{key}"),
            *("-l", "127.0.0.1", "{port}", "-k", "-m", "1000", "--exec", "/bin/cat"),
        ),
    ),
]
BY_NAME = {s.name: s for s in SERVERS}


def listening_event(line: str) -> dict[str, Any] | None:
    """The {"event": "listening", "address": "127.0.0.1:PORT"} log line (or "udp:..."),
    with "port" added."""
    try:
        event = json.loads(line)
    except ValueError:
        return None
    if not isinstance(event, dict) or event.get("event") != "listening":
        return None
    host, _, port = str(event.get("address", "")).removeprefix("udp:").rpartition(":")
    if host != "127.0.0.1" or not port.isdigit():
        return None
    return {**event, "port": int(port)}


def start(
    server: Server, workload: Workload, log: Path
) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """Start the server and wait for its listening event; return the process and the event.

    Raises:
        Unavailable: it exited or did not announce a port in time.
    """
    argv = server.argv(workload)
    with log.open("wb") as out:
        proc = processes.spawn(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + START_TIMEOUT_S
    while isinstance(server, ExternalServer) and time.monotonic() < deadline:
        port = server.ports[workload.name]
        if processes.tcp_listening(port):
            return proc, {"event": "listening", "address": f"127.0.0.1:{port}", "port": port}
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            event = listening_event(line)
            if event:
                return proc, event
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    processes.stop(proc)
    tail = log.read_text(errors="replace").strip().splitlines()[-3:]
    raise Unavailable(f"exit status {proc.returncode}: " + " | ".join(tail)[-400:])


def display_argv(server: Server, workload: Workload) -> list[str]:
    """The command line as the report shows it (repository-relative paths)."""
    try:
        if isinstance(server, ExternalServer):  # the port is picked at start: say PORT
            argv = [*processes.pinned(processes.SERVER_CPUS), *server.filled("PORT")]
        else:
            argv = server.argv(workload)
    except Unavailable:
        argv = [*processes.pinned(processes.SERVER_CPUS), *server.command(workload)]
    return [relative(a) for a in argv]
