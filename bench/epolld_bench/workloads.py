"""The workloads: what the load generators (bench/loadgen.c) do in each run.

To add a workload, add one entry to WORKLOADS. A workload is one measured client process
(`load`) and, optionally, clients started before it that run until it has finished:
firehoses (streaming clients beside it) and holders (idle connections, spread over
several processes and source addresses). `table` picks the report's layout (report.TABLES);
`targets.py` holds the pass/fail targets that refer to workloads by name.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

KIB = 1024
# The peers an engineer would pick instead of epolld (issue 24): Go's net and Rust's tokio.
PEERS = ("go", "tokio")
# The servers of the original matrix (issue 6) and the peers; workloads name their servers
# explicitly.
CLASSIC = (
    "c-epoll",
    "asyncio-protocol",
    "asyncio-streams",
    "uvloop-protocol",
    "epolld-level",
    "epolld-edge",
    "epolld-splice",
    *PEERS,
)
EPOLLD_BOTH = ("epolld-level", "epolld-edge")
# The UDP rows (issue 10): C with recvfrom/sendto and with recvmmsg/sendmmsg, asyncio and
# uvloop DatagramProtocol servers, epolld in both trigger modes (with its UDP limits off).
UDP_SERVERS = (
    "c-udp",
    "c-udp-mmsg",
    "asyncio-datagram",
    "uvloop-datagram",
    "epolld-level",
    "epolld-edge",
    "epolld-level-udp-limits",  # issue 24: the limiter at work on each datagram
    "epolld-edge-udp-limits",
    "go",  # its datagram loop (tokio's is not part of the comparison)
)
UDP_SOCKETS = 4  # connected client sockets
UDP_WINDOW = 16  # datagrams in flight per socket
# Idle connections per holder process: two processes' worth fit under 20,000 descriptors.
HOLDERS_PER_PROCESS = 10_000
CONNS_PER_SOURCE_ADDRESS = 20_000  # of the 28,232 ephemeral ports (32768-60999)
FIREHOSE_CHUNK = 256 * KIB
FIREHOSE_WINDOW = 64 * 1024 * KIB  # beyond every buffer on the path: as fast as it can


@dataclasses.dataclass(frozen=True)
class Load:
    """One load generator process: its loadgen arguments."""

    mode: str = "pingpong"  # pingpong | stream | udp (bench/udpgen.c instead of loadgen)
    conns: int = 1  # active connections
    size: int = KIB  # message (pingpong) or chunk (stream) bytes
    window: int = 0  # stream: bytes in flight per connection
    idle: int = 0  # more connections that echo one byte, then stay open and idle
    extra: tuple[str, ...] = ()
    tls: bool = False  # bench/tlsload.go instead of loadgen (modes pingpong and connect)

    @property
    def program(self) -> str:
        """The load generator in bench/out/bin/ that runs these arguments."""
        return "udpgen" if self.mode == "udp" else "tlsload" if self.tls else "loadgen"

    def args(self) -> list[str]:
        args = ["--mode", self.mode, "--conns", str(self.conns), "--size", str(self.size)]
        if self.window:
            args += ["--window", str(self.window)]
        if self.idle:
            args += ["--idle", str(self.idle)]
        return args + list(self.extra)


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    title: str  # may use {conns:,}: all connections of the run
    load: Load  # the measured client
    table: str = "pingpong"  # the report's layout: a key of report.TABLES
    servers: tuple[str, ...] = CLASSIC
    quick: bool = False  # part of --quick
    group: str = ""  # --only selects by name or group
    firehoses: int = 0  # streaming clients beside the measured one
    holders: int = 0  # idle connections opened (and echoing once) before the measured client
    holders_expire: bool = False  # the server's idle timeout closes them during the run
    scalable: bool = False  # --scale-conns sets its size
    epolld_limits: Mapping[str, str] = dataclasses.field(default_factory=dict)
    min_duration_s: float = 0.0  # measured at least this long (to cover an idle timeout)
    handoff: bool = False  # SIGUSR2 mid-run: the restart handoff (re-exec in place), timed
    holders_reprobe: bool = False  # at the end every held connection echoes once more

    @property
    def udp(self) -> bool:
        """Datagrams, not connections: the servers listen on UDP and udpgen measures."""
        return self.load.mode == "udp"

    @property
    def tls(self) -> bool:
        """The servers listen with TLS and tlsload measures."""
        return self.load.tls

    @property
    def conns(self) -> int:
        """Connections open at once during the run."""
        return self.load.conns + self.load.idle + self.holders + self.firehoses

    @property
    def heading(self) -> str:
        return self.title.format(conns=self.conns)

    def background(self) -> list[list[str]]:
        """loadgen arguments of each client started before the measured one."""
        out = [
            Load("stream", 1, FIREHOSE_CHUNK, window=FIREHOSE_WINDOW).args()
            for _ in range(self.firehoses)
        ]
        if self.holders:
            procs = math.ceil(self.holders / HOLDERS_PER_PROCESS)
            addrs = max(2, math.ceil(self.conns / CONNS_PER_SOURCE_ADDRESS))
            offset = 0  # the connections before this process's: no two share a source port
            for i in range(procs):
                share = self.holders // procs + (i < self.holders % procs)
                extra = ["--source-addrs", str(addrs), "--source-offset", str(offset)]
                offset += share
                if self.holders_expire:
                    extra.append("--expect-close")
                if self.holders_reprobe:
                    extra += ["--reprobe", "--drain-timeout", "10"]
                if self.conns > 2 * HOLDERS_PER_PROCESS:  # all holders connect at once
                    extra += ["--connect-timeout", str(10 + self.conns // 1_000)]
                    extra.append("--source-ports")  # connect()'s port search grows slow
                out.append(Load(conns=0, idle=share, extra=tuple(extra), tls=self.tls).args())
        return out

    def epolld_config(self) -> dict[str, str]:
        """Settings of epolld's `limits:` for this workload (the rest keeps its default)."""
        limits = dict(self.epolld_limits)
        if self.conns > 9_000:  # the default max_connections is 10,000
            limits.setdefault("max_connections", str(self.conns + 10))
        return limits

    def resized(self, conns: int) -> Workload:
        """The same workload with `conns` connections in all (--scale-conns)."""
        if not self.scalable:
            return self
        resized = dataclasses.replace(self, holders=max(0, conns - self.load.conns))
        if self.holders_expire and conns > SCALE_CONNS:
            # The idle timeout runs from each accept: it must outlast establishing them all
            # (seconds per 10,000 on this shared machine), or the first expire too early.
            timeout = IDLE_TIMEOUT_S + math.ceil(conns / 5_000)
            resized = dataclasses.replace(
                resized,
                epolld_limits={**self.epolld_limits, "idle_timeout": f"{timeout}s"},
                # The wave must end inside the measured interval: at 100,000 connections
                # over six workers on one core it ends 3.5-4.5 s after the last deadline.
                min_duration_s=timeout + 2.5 + math.ceil(conns / 20_000),
                title=self.title.replace(
                    f"idle_timeout {IDLE_TIMEOUT_S} s", f"idle_timeout {timeout} s"
                ),
            )
        return resized


def scale(name: str, conns: int, title: str, **kwargs: object) -> Workload:
    """`conns` connections: all but one held idle, one ping-pong client measured."""
    return Workload(
        name,
        title,
        Load(conns=1, size=KIB),
        table="scale",
        holders=conns - 1,
        **{"group": "scale", **kwargs},  # type: ignore[arg-type]
    )


SCALE_CONNS = 19_900  # this machine's RLIMIT_NOFILE is 20,000 per process
IDLE_TIMEOUT_S = 8  # the expiry wave: a tick of 1 s collects the connections in one or two sweeps

WORKERS = ("epolld-level", "epolld-workers-2")
# TLS (issue 21): Go's crypto/tls as the compiled reference, uvloop with ssl=, and for new
# connections the two tools that fork a process per connection.
TLS_SERVERS = ("go-tls", "uvloop-tls", *EPOLLD_BOTH)
TLS_CONNECTORS = 8  # tlsload workers, each connecting again as soon as its last one closed

WORKLOADS = [
    Workload("pp-1k-c1", "ping-pong 1 KiB, 1 connection", Load(conns=1)),
    Workload("pp-1k-c10", "ping-pong 1 KiB, 10 connections", Load(conns=10)),
    Workload("pp-1k-c100", "ping-pong 1 KiB, 100 connections", Load(conns=100), quick=True),
    Workload("pp-1k-c1000", "ping-pong 1 KiB, 1000 connections", Load(conns=1000)),
    Workload("pp-64-c100", "ping-pong 64 B, 100 connections", Load(conns=100, size=64)),
    Workload("pp-16k-c100", "ping-pong 16 KiB, 100 connections", Load(conns=100, size=16 * KIB)),
    Workload(
        "pp-128k-c100",
        "ping-pong 128 KiB, 100 connections",
        Load(conns=100, size=128 * KIB),
        quick=True,
    ),
    Workload(
        "stream-64k-c10",
        "streaming 10 connections x 64 KiB chunks, 256 KiB window",
        Load("stream", 10, 64 * KIB, window=256 * KIB),
        table="stream",
        quick=True,
    ),
    Workload(
        "idle-10k",
        "10,000 open connections, 100 active (ping-pong 1 KiB), 9,900 idle",
        Load(conns=100, idle=9_900),
        table="idle",
    ),
    Workload(
        "fairness",
        "fairness: one ping-pong client (1 KiB) beside two firehose clients"
        " (256 KiB writes, up to 64 MiB in flight each: as fast as the buffers allow)",
        Load(conns=1),
        table="fairness",
        servers=(
            "c-epoll",
            "epolld-level",
            "epolld-edge",
            "epolld-splice",
            "epolld-splice-edge",
        ),
        quick=True,
        group="fairness",
        firehoses=2,
    ),
    Workload(
        "udp-64",
        f"UDP echo, 64 B datagrams, {UDP_SOCKETS} sockets x {UDP_WINDOW} in flight",
        Load("udp", UDP_SOCKETS, 64, window=UDP_WINDOW),
        table="udp",
        servers=UDP_SERVERS,
        quick=True,
        group="udp",
    ),
    Workload(
        "udp-1k",
        f"UDP echo, 1 KiB datagrams, {UDP_SOCKETS} sockets x {UDP_WINDOW} in flight",
        Load("udp", UDP_SOCKETS, KIB, window=UDP_WINDOW),
        table="udp",
        servers=UDP_SERVERS,
        group="udp",
    ),
    scale(
        "scale",
        SCALE_CONNS,
        "scale: {conns:,} connections, each echoing once, then 1 KiB ping-pong on one",
        servers=("c-epoll", *EPOLLD_BOTH, *PEERS),
        scalable=True,
        quick=True,
    ),
    scale(
        "scale-10k",
        10_000,
        "scale: {conns:,} connections (every io mode), then 1 KiB ping-pong on one",
        servers=("c-epoll", *EPOLLD_BOTH, "epolld-splice", *PEERS),
    ),
    scale(
        "scale-expiry",
        SCALE_CONNS,
        "scale: {conns:,} connections expire at once (idle_timeout "
        f"{IDLE_TIMEOUT_S} s) while one ping-pong client (1 KiB) keeps going",
        servers=EPOLLD_BOTH,
        scalable=True,
        holders_expire=True,
        epolld_limits={"idle_timeout": f"{IDLE_TIMEOUT_S}s"},
        min_duration_s=IDLE_TIMEOUT_S + 2.5,
    ),
    *(
        Workload(
            f"handoff-{conns // 1000}k",
            "handoff: {conns:,} connections handed to a re-executed epolld (SIGUSR2) while "
            "one ping-pong client (1 KiB) keeps going; time from the signal to READY=1",
            Load(conns=1, size=KIB),
            table="handoff",
            group="handoff",
            servers=("epolld-level", "epolld-splice", "epolld-workers-2"),
            holders=conns - 1,
            handoff=True,
            min_duration_s=3.0,
        )
        for conns in (1_000, 10_000)
    ),
    # issue 24: the handoff at scale, every held connection echoing again afterwards;
    # bench/run --only handoff-scale --scale-conns 100000 --workers 6
    Workload(
        "handoff-scale",
        "handoff: {conns:,} connections handed to a re-executed epolld (SIGUSR2) while one"
        " ping-pong client (1 KiB) keeps going, then every held one echoes once more; time"
        " from the signal to READY=1",
        Load(conns=1, size=KIB),
        table="handoff",
        group="scale-handoff",
        servers=("epolld-level",),
        holders=10_000 - 1,
        handoff=True,
        holders_reprobe=True,
        scalable=True,
        min_duration_s=8.0,
    ),
    # workers: the same load on 1 and on N processes. On this 2-core machine (server on
    # one core) they show the cost per round trip; with --server-cpus 0-7 the scaling.
    Workload(
        "workers-pp-1k-c100",
        "workers: ping-pong 1 KiB, 100 connections",
        Load(conns=100),
        servers=(*WORKERS, "epolld-workers-auto"),
        group="workers",
    ),
    scale(
        "workers-scale-10k",
        10_000,
        "workers: {conns:,} connections, then 1 KiB ping-pong on one (Pss of all processes)",
        servers=WORKERS,
        group="workers",
    ),
]
WORKLOADS += [
    Workload(
        "tls-pingpong",
        "TLS ping-pong 1 KiB, 100 connections (TLS 1.3, handshakes before the measurement)",
        Load(conns=100, tls=True),
        table="tls-pingpong",
        servers=TLS_SERVERS,
        group="tls",
    ),
    Workload(
        "tls-connect",
        f"new TLS connections: {TLS_CONNECTORS} clients each connect, complete a full"
        " handshake, echo 1 KiB, close (close_notify, FIN), again",
        Load("connect", TLS_CONNECTORS, tls=True),
        table="tls-connect",
        servers=(*TLS_SERVERS, "socat-tls", "ncat-tls"),
        group="tls",
    ),
    Workload(
        "tls-idle",
        "{conns:,} TLS connections, handshake done and one byte echoed, idle; then 1 KiB"
        " ping-pong on one",
        Load(conns=1, tls=True),
        table="tls-idle",
        servers=("go-tls", *EPOLLD_BOTH),
        group="tls",
        holders=9_999,
    ),
]
BY_NAME = {w.name: w for w in WORKLOADS}


def select(names: str | None, quick: bool, scale_conns: int | None) -> list[Workload]:
    """The workloads named (by name or group), or the preset's; resized by --scale-conns.

    Raises:
        ValueError: a name that is neither a workload nor a group.
    """
    chosen = [w for w in WORKLOADS if w.quick or not quick]
    if names:
        wanted = set(names.split(","))
        unknown = wanted - {w.name for w in WORKLOADS} - {w.group for w in WORKLOADS}
        if unknown:
            raise ValueError(f"unknown workloads: {', '.join(sorted(unknown))}")
        chosen = [w for w in WORKLOADS if w.name in wanted or w.group in wanted]
    return [w.resized(scale_conns) if scale_conns else w for w in chosen]
