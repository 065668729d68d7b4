"""The Markdown report (docs/benchmarks.md) from a run's JSON data.

Each workload's table layout is a list of columns in TABLES; a workload names its layout
(workloads.Workload.table). A column is a header and a function of (the server's summary
entry, the table's context) that returns the cell text.
"""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Callable
from typing import Any

from . import processes
from .paths import ANALYSIS
from .runner import FOREIGN_MAX, HANDOFF_STEPS, RETRIES
from .servers import BY_NAME as SERVERS
from .servers import display_argv
from .targets import evaluate
from .workloads import BY_NAME as WORKLOADS
from .workloads import Workload

DASH = "\u2013"  # an en dash: "no figure", and min-max ranges in the tables
Entry = dict[str, Any]


def fmt(x: float | None, digits: int = 0) -> str:
    if x is None:
        return DASH
    return f"{x:,.{digits}f}"


def mm(entry: Entry | None, digits: int = 0) -> str:
    """median (min-max)"""
    if not entry:
        return DASH
    if entry["min"] == entry["max"]:
        return fmt(entry["median"], digits)
    low, high = fmt(entry["min"], digits), fmt(entry["max"], digits)
    return f"{fmt(entry['median'], digits)} ({low}{DASH}{high})"


def med(entry: Entry, key: str) -> float | None:
    return (entry.get(key) or {}).get("median")


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else DASH


@dataclasses.dataclass(frozen=True)
class Context:
    """What a cell may compare with: the same workload's C and uvloop entries."""

    workload: Workload
    c: Entry
    uv: Entry
    go: Entry = dataclasses.field(default_factory=dict)  # the peers (issue 24)
    tokio: Entry = dataclasses.field(default_factory=dict)


Cell = Callable[[Entry, Context], str]


def col_median(key: str, digits: int = 0) -> Cell:
    return lambda e, _: fmt(med(e, key), digits)


def col_range(key: str, digits: int = 0) -> Cell:
    return lambda e, _: mm(e.get(key), digits)


def col_vs(key: str, ref: str) -> Cell:
    return lambda e, ctx: ratio(med(e, key), med(getattr(ctx, ref), key))


def col_share(key: str) -> Cell:
    return lambda e, _: fmt((med(e, key) or 0) * 100) + "%"


def col_other(e: Entry, _: Context) -> str:
    mine, client = med(e, "foreign_load") or 0, med(e, "client_foreign_load") or 0
    return f"{fmt(mine * 100)}% / {fmt(client * 100)}%"


def col_errors(e: Entry, _: Context) -> str:
    if not e["error_kinds"]:
        return str(e["errors"])
    return f"{e['errors']} ({', '.join(f'{k} {v}' for k, v in e['error_kinds'].items())})"


def col_cpu_per_gb(e: Entry, ctx: Context) -> str:
    cpu = med(e, "cpu_s_per_m_rt")
    return fmt(cpu * 1e-6 / (ctx.workload.load.size / 1e9) if cpu is not None else None, 3)


def _col_step(step: str) -> Cell:
    """A handoff step's median in ms, and per connection in µs (the projection's input)."""

    def cell(e: Entry, _: Context) -> str:
        seconds = med(e, f"handoff_{step}_s")
        per_conn = med(e, f"handoff_{step}_us_per_conn")
        if seconds is None:
            return DASH
        return f"{fmt(seconds * 1000, 1)} ({fmt(per_conn, 1)})"

    return cell


Column = tuple[str, Cell]
CPU: list[Column] = [
    ("CPU/Mrt", col_range("cpu_s_per_m_rt", 2)),
    ("user", col_share("user_share")),
    ("vs C", col_vs("cpu_s_per_m_rt", "c")),
    ("vs uvloop", col_vs("cpu_s_per_m_rt", "uv")),
    ("vs Go", col_vs("cpu_s_per_m_rt", "go")),
    ("vs tokio", col_vs("cpu_s_per_m_rt", "tokio")),
]
LATENCY: list[Column] = [
    ("p50 µs", col_median("p50_us")),
    ("p99 µs", col_median("p99_us")),
    ("p99.9 µs", col_median("p99_9_us")),
]
TAIL: list[Column] = [
    ("RSS MiB", col_median("peak_rss_mib", 1)),
    ("client", col_share("client_busy")),
    ("other", col_other),
    ("errors", col_errors),
]
TABLES: dict[str, list[Column]] = {
    "pingpong": [
        ("rt/s", col_range("round_trips_per_s")),
        ("MB/s", col_median("mb_per_s", 1)),
        *CPU,
        *LATENCY,
        *TAIL,
    ],
    "idle": [
        ("all connected (s)", col_range("connect_all_s", 3)),
        ("all echoing (s)", col_median("probe_all_s", 3)),
        ("rt/s", col_range("round_trips_per_s")),
        *CPU,
        *LATENCY,
        *TAIL,
    ],
    "stream": [
        ("MB/s", col_range("mb_per_s")),
        ("chunks/s", col_median("round_trips_per_s")),
        ("CPU s per GB", col_cpu_per_gb),
        ("vs C", col_vs("mb_per_s", "c")),
        ("vs uvloop", col_vs("mb_per_s", "uv")),
        ("CPU vs Go", col_vs("cpu_s_per_m_rt", "go")),
        ("CPU vs tokio", col_vs("cpu_s_per_m_rt", "tokio")),
        *TAIL,
    ],
    "fairness": [
        ("ping-pong p50 µs", col_range("p50_us")),
        ("p99 µs", col_range("p99_us")),
        ("p99.9 µs", col_median("p99_9_us")),
        ("max µs", col_median("max_us")),
        ("p99 vs C", col_vs("p99_us", "c")),
        ("ping-pong rt/s", col_median("round_trips_per_s")),
        ("firehoses MB/s", col_range("firehose_mb_per_s")),
        *TAIL,
    ],
    "scale": [
        ("all connected (s)", col_range("all_connected_s", 3)),
        ("all echoing (s)", col_range("all_echoing_s", 3)),
        ("vs C", col_vs("all_echoing_s", "c")),
        ("start-up RSS MiB", col_median("start_rss_mib", 1)),
        ("peak RSS MiB", col_range("peak_rss_mib", 1)),
        ("KiB per conn", col_range("rss_per_conn_kib", 3)),
        ("Pss KiB per conn, all processes", col_range("idle_pss_kib_per_conn", 3)),
        ("listen drops", col_range("listen_drops")),
        ("pipe fds", col_median("server_pipes")),
        ("ping-pong p50 µs", col_median("p50_us")),
        ("p99 µs", col_range("p99_us")),
        ("max µs", col_median("max_us")),
        ("loop's longest turn ms", col_median("longest_turn_ms", 1)),
        ("CPU/Mrt", col_range("cpu_s_per_m_rt", 2)),
        ("CPU vs Go", col_vs("cpu_s_per_m_rt", "go")),
        ("CPU vs tokio", col_vs("cpu_s_per_m_rt", "tokio")),
        ("other", col_other),
        ("errors", col_errors),
    ],
}
TABLES["handoff"] = [
    ("handed over", col_median("handoff_conns")),
    ("signal to READY=1 (s)", col_range("handoff_s", 3)),
    *((f"{step} ms (µs/conn)", _col_step(step)) for step in HANDOFF_STEPS),
    ("ping-pong max µs", col_range("max_us")),
    ("echoing again afterwards", col_median("reprobed")),
    ("loop's longest turn ms", col_range("longest_turn_ms", 1)),
    ("errors", col_errors),
]
TABLES["workers-scale-10k"] = [
    ("all echoing (s)", col_range("all_echoing_s", 3)),
    ("Pss MiB, all processes", col_range("pss_mib", 1)),
    ("Pss MiB, largest process", col_range("max_process_pss_mib", 1)),
    ("peak RSS MiB (main)", col_range("peak_rss_mib", 1)),
    ("ping-pong p50 µs", col_median("p50_us")),
    ("p99 µs", col_range("p99_us")),
    ("other", col_other),
    ("errors", col_errors),
]
TABLES["udp"] = [
    ("datagrams/s", col_range("round_trips_per_s")),
    ("CPU s/M datagrams", col_range("cpu_s_per_m_rt", 2)),
    ("user", col_share("user_share")),
    ("vs C", col_vs("cpu_s_per_m_rt", "c")),
    ("vs uvloop", col_vs("cpu_s_per_m_rt", "uv")),
    ("vs Go", col_vs("cpu_s_per_m_rt", "go")),
    ("loss", lambda e, _: fmt((med(e, "loss_ratio") or 0) * 100, 2) + "%"),
    ("p50 µs", col_median("p50_us")),
    ("p99 µs", col_median("p99_us")),
    ("RSS MiB", col_median("peak_rss_mib", 1)),
    ("other", col_other),
    ("errors", col_errors),
]


def col_ms(key: str) -> Cell:
    """A per-connection figure kept in s per million (or µs) shown in ms."""
    return lambda e, _: mm(_scaled(e.get(key), 1e-3), 2)


def _scaled(entry: Entry | None, factor: float) -> Entry | None:
    if not entry:
        return None
    return {k: entry[k] * factor for k in ("median", "min", "max")}


def col_turns(e: Entry, _: Context) -> str:
    """The longest turn of any epolld process's loop before the measured client started
    and at its end: a larger second figure is the wave's (or the ping-pong's)."""
    before, after = med(e, "longest_turn_before_ms"), med(e, "longest_turn_ms")
    return f"{fmt(before, 1)} / {fmt(after, 1)}"


def col_deferred(e: Entry, _: Context) -> str:
    """The same for the CPU of the loop's own deferred work in one turn (accepting, idle
    sweeps, close batches): what the daemon did, not the waits for a shared core."""
    before = med(e, "longest_deferred_cpu_before_ms")
    after = med(e, "longest_deferred_cpu_ms")
    return f"{fmt(before, 1)} / {fmt(after, 1)}"


def col_tls(e: Entry, _: Context) -> str:
    return ", ".join(e.get("tls") or []) or DASH


# TLS (issue 21): the references are Go's crypto/tls server and uvloop with ssl= (Context's
# c and uv for these workloads); a connect "round trip" is one whole connection.
TABLES["tls-pingpong"] = [
    ("rt/s", col_range("round_trips_per_s")),
    ("CPU/Mrt", col_range("cpu_s_per_m_rt", 2)),
    ("user", col_share("user_share")),
    ("vs Go", col_vs("cpu_s_per_m_rt", "c")),
    ("vs uvloop", col_vs("cpu_s_per_m_rt", "uv")),
    ("p50 µs", col_median("p50_us")),
    ("p99 µs", col_median("p99_us")),
    ("RSS MiB", col_median("peak_rss_mib", 1)),
    ("TLS", col_tls),
    ("client", col_share("client_busy")),
    ("other", col_other),
    ("errors", col_errors),
]
TABLES["tls-connect"] = [
    ("connections/s", col_range("round_trips_per_s")),
    ("vs Go", col_vs("round_trips_per_s", "c")),
    ("server CPU ms per connection", col_ms("cpu_s_per_m_rt")),
    ("CPU vs Go", col_vs("cpu_s_per_m_rt", "c")),
    ("user", col_share("user_share")),
    ("p50 ms", lambda e, _: fmt((med(e, "p50_us") or 0) / 1000, 2)),
    ("p99 ms", lambda e, _: fmt((med(e, "p99_us") or 0) / 1000, 2)),
    ("RSS MiB", col_median("peak_rss_mib", 1)),
    ("client", col_share("client_busy")),
    ("other", col_other),
    ("errors", col_errors),
]
TABLES["tls-idle"] = [
    ("all echoing (s)", col_range("all_echoing_s", 2)),
    ("start-up RSS MiB", col_median("start_rss_mib", 1)),
    ("RSS MiB, all idle", col_range("established_rss_mib", 1)),
    ("KiB per conn, RSS", col_range("idle_rss_kib_per_conn", 2)),
    ("KiB per conn, Pss", col_range("idle_pss_kib_per_conn", 2)),
    ("peak RSS MiB", col_median("peak_rss_mib", 1)),
    ("KiB per conn, peak RSS", col_median("rss_per_conn_kib", 2)),
    ("ping-pong p50 µs", col_median("p50_us")),
    ("p99 µs", col_median("p99_us")),
    ("other", col_other),
    ("errors", col_errors),
]
TABLES["scale-expiry"] = [
    ("expired", col_median("expired")),
    ("wave (s)", col_range("wave_s", 3)),
    ("probe p50 µs", col_median("p50_us")),
    ("p99 µs", col_median("p99_us")),
    ("longest round trip µs", col_range("max_us")),
    ("loop's longest turn ms, before / after", col_turns),
    ("its deferred work's CPU ms, before / after", col_deferred),
    ("turns over 100 ms during the wave", col_median("slow_turns_measured")),
    ("peak RSS MiB", col_median("peak_rss_mib", 1)),
    ("other", col_other),
    ("errors", col_errors),
]


def method(data: dict[str, Any]) -> list[str]:
    opts = data["options"]
    retried = (
        f"; a run with more than {FOREIGN_MAX:.0%} on either core was repeated, up to"
        f" {RETRIES} times, within a budget of a quarter of each workload's runs."
        if opts.get("retry")
        else "; disturbed runs were not repeated in this run."
    )
    return [
        "Each figure is the **median of the repeats (min-max)**; every configuration ran"
        f" {opts['reps']} times, interleaved across servers (A B C ... A B C ...), each run on a"
        f" freshly started server, {opts['warmup']} s of warm-up then {opts['duration']} s"
        " measured."
        f" The server is pinned to CPU {processes.SERVER_CPU}, the C load generator"
        f" (`bench/loadgen.c`) to CPU {processes.CLIENT_CPU}, both at nice"
        f" {processes.NICE_LEVEL} in sessions whose autogroup is niced too;"
        " every echoed byte is verified.",
        "",
        "**CPU/Mrt**, the primary figure, is the server's CPU seconds (utime+stime from"
        " `/proc/PID/stat`, read at the start and end of the measured interval) per million round"
        " trips: it stays honest when the client saturates its core. **user** is the user-space"
        " share of it (the rest is the kernel: system calls and the TCP work they do). **RSS** is"
        " the server's peak resident set (VmHWM) over its whole life. **client** is the load"
        " generator's own CPU use over the measured interval: near 100% means the client, not the"
        " server, set the pace, so compare CPU/Mrt rather than round trips/s. **other** is the"
        " share of the server's core / of the client's core that went to other work during the"
        " measured interval (this machine is shared; about 10 points of it is softirq work for"
        " the benchmark's own traffic, which the kernel charges to no process); a slowed client"
        " changes the server's batching, so both matter"
        + retried
        + " Ratios are of the CPU/Mrt medians (of MB/s for streaming).",
        "",
        "**Fairness** and **scale** runs start background clients first (two firehoses, or the "
        "holders of the idle connections: processes of at most 10,000 connections each, bound "
        "to source addresses 127.0.0.2, .3, ... so that the 4-tuples do not run out), wait "
        "until each has established its connections, then measure one ping-pong client beside "
        f"them; the background clients run at nice {processes.BACKGROUND_NICE_LEVEL}, so that "
        "the measured client preempts them on its core when it wakes. **all echoing** is the "
        "time from the first connect() to the last connection's first echo; **KiB per conn** is"
        " the server's peak RSS above its start-up RSS (read right after it announced its port)"
        " divided by the connections. In the **expiry** run the idle timeout closes every held "
        "connection while the ping-pong client keeps sending: its longest round trip is the "
        "longest the loop was held, and **turns over 100 ms** counts the loop turns of over "
        "100 ms in every epolld process while it ran (the stats line's slow_turns, after minus"
        " before). **listen drops** (TcpExt ListenDrops) counts handshakes a "
        "full accept queue dropped while the connections were established: each is retried "
        "after 1 s, so a server that drains its queue too slowly pays whole seconds. **pipe "
        "fds** (splice) are its pipe ends. In the fairness table the client core's **other**"
        " includes the firehoses.",
        "",
        "The **TLS** workloads use `bench/tlsload.go` (Go's crypto/tls, one goroutine per"
        " connection, pinned like loadgen, every byte verified) and one self-signed ECDSA P-256"
        " certificate (`bench/out/tls/`) for every server; the client skips verifying the chain,"
        " not the handshake, and keeps no session cache, so each new connection is a full"
        " handshake. The **TLS** column is what was negotiated. For the forking servers (socat,"
        " ncat) the server CPU includes their children's (cutime+cstime of the reaped ones)."
        " **KiB per conn, RSS / Pss** in the idle table is the server's RSS (Pss) once every"
        " holder's connections were established and idle, above its start-up figure, per held"
        " connection; the peak column includes what the 10,000 handshakes used on the way.",
        "",
    ]


def targets_table(data: dict[str, Any]) -> list[str]:
    out = [
        "## Targets (issues 6, 9, 10, 21 and 24)",
        "",
        "Measured is the median (its ratio to the reference's median); a result is decided on"
        " those. **Paired** is the median (min-max) of the per-repeat ratios, each taken between"
        " neighbouring runs of the interleaved order: when its range straddles the limit, the"
        " result is within this machine's noise. Latencies are in µs, times in s, RSS in MiB.",
        "",
        "| Target | Measured | Limit | Paired | Result | Reason for a miss |",
        "|---|---|---|---|---|---|",
    ]
    for t in evaluate(data["summary"], data.get("raw")):
        value = t["value"]
        if isinstance(value, int):
            shown = str(value)
        else:
            shown = fmt(value, 3 if value is not None and value < 10 else 2)
        if t.get("ratio") is not None:
            shown += f" ({t['ratio']:.2f}x)"
        limit = t.get("limit")
        digits = 3 if (limit or 0) < 10 else 2
        limit_text = fmt(limit, digits) if limit is not None else DASH
        paired = DASH
        if t.get("paired"):
            p_med, low, high = t["paired"]
            paired = f"{p_med:.2f}x ({low:.2f}{DASH}{high:.2f})"
        out.append(
            f"| {t['target']} | {shown} | {limit_text} | {paired} | **{t['status']}**"
            f" | {t.get('reason', '')} |"
        )
    return [*out, ""]


def workload_tables(data: dict[str, Any], loadgen_args: dict[str, list[str]]) -> list[str]:
    out: list[str] = []
    summary = data["summary"]
    for name, workload in WORKLOADS.items():  # the saved JSON has its keys sorted
        per = summary.get(name)
        if not per:
            continue
        columns = TABLES.get(name) or TABLES[workload.table]
        c, uv = ("c-udp", "uvloop-datagram") if workload.udp else ("c-epoll", "uvloop-protocol")
        if workload.tls:
            c, uv = "go-tls", "uvloop-tls"
        ctx = Context(
            workload, per.get(c, {}), per.get(uv, {}), per.get("go", {}), per.get("tokio", {})
        )
        title = data.get("titles", {}).get(name, workload.heading)
        out += [f"## {title}", ""]
        args = loadgen_args.get(name) or workload.load.args()
        program = workload.load.program
        out += [f"`{program} --port PORT --server-pid PID {' '.join(args)}`", ""]
        background = data.get("background", {}).get(name)
        if background:
            out += [f"beside: {background}", ""]
        head = "| Server | " + " | ".join(h for h, _ in columns) + " |"
        out += [head, "|" + "---|" * (len(columns) + 1)]
        for sname, server in SERVERS.items():
            entry = per.get(sname)
            if not entry:
                continue
            label = data.get("server_titles", {}).get(sname, server.title)
            if server and server.io == "splice" and "splice" not in entry.get("io", ["splice"]):
                label += " — **ran as copy** (no pipes)"
            out.append(f"| {label} | " + " | ".join(cell(entry, ctx) for _, cell in columns) + " |")
        out.append("")
    return out


def render_markdown(data: dict[str, Any]) -> str:
    machine, opts = data["machine"], data["options"]
    out = [
        "# epolld benchmarks",
        "",
        f"Generated by `bench/run {opts['preset']}` on {machine['date_utc']}"
        f" (epolld {machine['epolld_commit']});"
        f" wall time {data['wall_s']:.0f} s. Raw results: `{opts['json_name']}`.",
        "",
        *(
            f"The workloads {', '.join(m['workloads'])} are from a later run,"
            f" `bench/run {m['preset']}` ({m['reps']} repeats) on {m['date_utc']}"
            f" (epolld {m['epolld_commit']}), merged in with `bench/run --report --merge`.\n"
            for m in data.get("merged", [])
        ),
        *method(data),
    ]
    if data["unavailable"]:
        out += ["Not available in this run:", ""]
        out += [f"- {name}: {why}" for name, why in data["unavailable"].items()]
        out.append("")
    out += targets_table(data)
    loadgen = {
        k: v[v.index("--mode") :]
        for k, v in data.get("commands", {}).get("loadgen", {}).items()
        if "--mode" in v
    }
    out += workload_tables(data, loadgen)
    if ANALYSIS.exists():
        out += [ANALYSIS.read_text().strip(), ""]
    out += [
        "## Machine",
        "",
        f"- CPU: {machine['cpu_model']}, {machine['cpus']} CPUs"
        f" (server on CPU {processes.SERVER_CPU}, client on CPU {processes.CLIENT_CPU})",
        f"- OS: {machine['os']}, kernel {machine['kernel']}",
        f"- Python (epolld): {machine['python_epolld']}",
        f"- Python (baselines): {machine['python_bench']}, uvloop {machine['uvloop']}",
        f"- C: {machine['gcc']}, `-O2`",
        f"- RLIMIT_NOFILE {machine['nofile_limit']}, net.core.somaxconn {machine['somaxconn']};"
        " every server listens with backlog 511",
        "",
        "## Commands",
        "",
        "```",
        "make bench        # bench/run --full: all workloads x 5 -> docs/benchmarks.{md,json}",
        "make bench-quick  # bench/run --quick: a short subset -> bench/out/quick.{md,json}",
        "bench/run --only fairness,scale --repeats 1   # some workloads -> bench/out/quick.*",
        "bench/run --full --scale-conns 100000         # where RLIMIT_NOFILE allows",
        "bench/run --profile level,edge  # py-spy of epolld -> bench/out/profile-*.txt",
        "```",
        "",
        "Each run starts one server and one load generator, for example:",
        "",
        "```",
    ]
    example = WORKLOADS["pp-1k-c100"]
    names = sorted({s for per in data["summary"].values() for s in per}, key=list(SERVERS).index)
    for name in names:
        out.append(shlex.join(display_argv(SERVERS[name], example)))
    out += [
        "nice -n -10 taskset -c 1 bench/out/bin/loadgen --port PORT --server-pid PID"
        f" --warmup {opts['warmup']} --duration {opts['duration']}"
        f" --watch-cpu {processes.SERVER_CPU} --mode pingpong --conns 100 --size 1024",
        "```",
        "",
        "epolld's generated config (`bench/out/epolld-*.yaml`) sets only"
        ' `listen: ["127.0.0.1:0"]`, `trigger`, for splice `io: splice`, and for the scale'
        " workloads `limits.max_connections` (and the expiry run's `limits.idle_timeout`),"
        " for the TLS workloads `{address: ..., tls: true}` and `tls: {certificate, key}`:"
        " everything else (idle timeout, stats, logging at info) keeps its default. Each server"
        ' prints `{"event": "listening", "address": "127.0.0.1:PORT"}`; the runner reads the'
        " port from it.",
        "",
    ]
    return "\n".join(out)
