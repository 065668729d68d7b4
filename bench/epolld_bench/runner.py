"""One run (a fresh server, its load generators) and the interleaved matrix of runs.

A run: start the server and note its resident set; start the workload's background
clients (firehoses, holders of idle connections) and wait until each has established its
connections; then run the measured client; then release the background clients (close
their stdin) and collect every client's JSON result; stop the server. Only the processes
started here are ever signalled, by process group.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import processes
from .paths import BIN, OUT
from .servers import CServer, EpolldServer, Server, Unavailable, start
from .workloads import Workload

# The steps of a handoff as handoff_complete reports them (epolld/service/; with workers,
# the supervisor's: "workers" is until every worker has handed over and exited, then its
# own send and state, "startup" to the next supervisor's start, "receive", and
# "workers_restore" from there to READY=1). With workers, "worker_STEP" is the longest
# of the workers' own STEP (their handoff_complete lines): they run at the same time.
_STEPS = ("workers", "collect", "send", "state", "startup", "receive", "restore", "ready")
# *_cpu: the process's CPU time in those steps (the wall clock's are stretched by the
# other processes on the core, the five other workers' included).
WORKER_STEPS = (
    "collect", "send", "state", "handoff_cpu", "receive", "restore", "restore_cpu", "ready"
)  # fmt: skip
HANDOFF_STEPS = (*_STEPS, "workers_restore", *(f"worker_{step}" for step in WORKER_STEPS))

ESTABLISH_TIMEOUT_S = 40.0  # for the background clients to connect and echo once
# A run whose server core was busier than that with other work is repeated. About 0.1 of it is
# the softirq share of the benchmark's own loopback traffic, which is not charged to the server.
FOREIGN_MAX = 0.3
RETRIES = 2  # at most this many repeats of a disturbed run
HOLD_CAP_S = 600.0  # background clients stop by themselves after this, released or not

Result = dict[str, Any]


def loadgen_argv(
    args: list[str],
    port: int,
    pid: int,
    warmup: float,
    duration: float,
    hold: bool = False,
    program: str = "loadgen",  # or udpgen, tlsload: Load.program
) -> list[str]:
    nice = processes.BACKGROUND_NICE_LEVEL if hold else processes.NICE_LEVEL
    argv = [
        *processes.pinned(processes.CLIENT_CPUS, nice), str(BIN / program),
        "--port", str(port), "--server-pid", str(pid),
        "--warmup", str(warmup), "--duration", str(duration),
        "--watch-cpu", str(processes.SERVER_CPU),
    ]  # fmt: skip
    if hold:
        argv.append("--hold-stdin")
    return argv + args


def measured_seconds(workload: Workload, opts: argparse.Namespace) -> float:
    return max(float(opts.duration), workload.min_duration_s)


def _wait_established(
    clients: list[subprocess.Popen[bytes]], timeout_s: float = ESTABLISH_TIMEOUT_S
) -> str | None:
    """Wait for each background client's "established" line; None, or what went wrong."""
    deadline = time.monotonic() + timeout_s
    for proc in clients:
        assert proc.stderr is not None
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([proc.stderr], [], [], left)[0]:
                return "a background client did not establish its connections in time"
            chunk = os.read(proc.stderr.fileno(), 1)  # unbuffered: select() sees the rest
            if not chunk:
                return "a background client exited early"
            line += chunk
        if line.strip() != b"established":
            return "a background client said: " + line.decode(errors="replace").strip()
    return None


def _json(stdout: bytes, stderr: bytes) -> Result:
    try:
        result: Result = json.loads(stdout)
    except ValueError:
        return {"error_total": 1, "loadgen_failed": stderr.decode(errors="replace")[-400:]}
    return result


def run_once(server: Server, workload: Workload, rep: int, opts: argparse.Namespace) -> Result:
    """Start a fresh server, run the workload's load generators against it once, stop it."""
    log = OUT / "logs" / f"{workload.name}.{server.name}.{rep}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    proc, listening = start(server, workload, log)
    port, duration = listening["port"], measured_seconds(workload, opts)
    _wait_processes(proc, server)
    extra: Result = {
        "server_start_rss_kib": processes.status_kib(proc.pid, "VmRSS"),
        # Every process of the server (epolld's workers, the C server's siblings).
        "server_start_pss_kib": sum(
            processes.pss_kib(pid) or 0 for pid in processes.tree_pids(proc.pid)
        ),
    }
    background: list[subprocess.Popen[bytes]] = []
    bg_results: list[Result] = []
    pipes = None
    drops_before = processes.listen_drops()
    try:
        for args in workload.background():
            argv = loadgen_argv(
                args, port, proc.pid, 0.0, HOLD_CAP_S, hold=True, program=workload.load.program
            )
            background.append(
                processes.spawn(
                    argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
                )
            )
        problem = (
            _wait_established(background, ESTABLISH_TIMEOUT_S + workload.conns * 2e-3)
            if background
            else None
        )
        if problem:
            extra["background_failed"] = problem
        if workload.holders:
            drops = processes.listen_drops()
            if drops is not None and drops_before is not None:
                extra["listen_drops"] = drops - drops_before
            extra["server_established_rss_kib"] = processes.status_kib(proc.pid, "VmRSS")
            # Every process of the server (epolld's supervisor and workers), by Pss: pages
            # the workers share after fork are counted once in the total.
            pss = [processes.pss_kib(pid) or 0 for pid in processes.tree_pids(proc.pid)]
            extra["server_pss_mib"] = round(sum(pss) / 1024, 2)
            extra["server_max_process_pss_mib"] = round(max(pss) / 1024, 2)
            extra["server_processes"] = len(pss)
            extra["server_pss_mib_each"] = [round(kib / 1024, 2) for kib in pss]
            if server.io == "splice":
                pipes = processes.count_pipes(proc.pid)
        if workload.holders and isinstance(server, EpolldServer):
            loops = loop_figures(proc, log)
            extra["longest_turn_before_ms"] = loops.get("longest_turn_ms")
            extra["longest_deferred_cpu_before_ms"] = loops.get("longest_deferred_cpu_ms")
            extra["slow_turns_before"] = loops.get("slow_turns")
        before = processes.cpu_jiffies()
        program = workload.load.program
        argv = loadgen_argv(
            workload.load.args(), port, proc.pid, opts.warmup, duration, program=program
        )
        gen = processes.spawn(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        limit = opts.warmup + duration + 40  # connect 10 + drain 3 + stall 5 + slack
        if workload.handoff:
            _signal_handoff(proc, opts.warmup + duration / 3)
        try:
            if server.io == "splice" and pipes is None and "io" not in listening:
                # The daemon does not say which io mode it runs: look for its pipes mid-run.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    gen.wait(opts.warmup + duration / 2 + (0.7 if workload.load.idle else 0.05))
                pipes = processes.count_pipes(proc.pid)
            stdout, stderr = gen.communicate(timeout=limit)
        finally:
            processes.stop(gen)
        after = processes.cpu_jiffies()
        for client in background:
            try:
                out, err = client.communicate(input=b"", timeout=30)
            except subprocess.TimeoutExpired:
                out, err = b"", b"did not finish within 30 s of its release"
            finally:
                processes.stop(client)
            bg_results.append(_json(out, err))
        alive = proc.poll() is None
        hwm = processes.status_kib(proc.pid, "VmHWM")
        if alive and workload.holders and isinstance(server, EpolldServer):
            loops = loop_figures(proc, log)
            extra["longest_turn_ms"] = loops.get("longest_turn_ms")
            extra["longest_deferred_cpu_ms"] = loops.get("longest_deferred_cpu_ms")
            slow_before = extra.get("slow_turns_before")
            if loops.get("slow_turns") is not None and slow_before is not None:
                # Turns of over 100 ms while the measured client ran (the wave's, in expiry).
                extra["slow_turns_measured"] = loops["slow_turns"] - slow_before
    finally:
        for client in background:
            processes.stop(client)
        processes.stop(proc)
    result = _json(stdout, stderr)
    result.update(extra)
    result["server_alive"] = alive
    if not alive:
        result["error_total"] = result.get("error_total", 0) + 1
    if extra.get("background_failed"):
        result["error_total"] = result.get("error_total", 0) + 1
    result["server_peak_rss_mib"] = round(hwm / 1024, 2) if hwm else None
    _derive(result, before, after)
    _merge_background(result, bg_results, workload)
    if hwm and extra["server_start_rss_kib"]:
        result["server_start_rss_mib"] = round(extra["server_start_rss_kib"] / 1024, 2)
        if workload.holders:
            result["rss_per_conn_kib"] = round(
                (hwm - extra["server_start_rss_kib"]) / workload.conns, 3
            )
    _idle_memory(result, extra, workload)
    if "io" in listening:
        result["io"] = listening["io"]
    elif pipes is not None:  # splice holds a pipe (two fds) per connection
        want = 1 if workload.holders else workload.load.conns
        result["io"] = "splice" if pipes >= want else "copy"
    result["server_pipes"] = pipes
    result["server_pid"], result["port"] = proc.pid, port
    if workload.handoff:
        _handoff_figures(result, log, workload.conns)
    return result


def _wait_processes(proc: subprocess.Popen[bytes], server: Server) -> None:
    """Until every process of a multi-process server exists (epolld's supervisor may say
    "listening" before it has forked its workers), so that start-up Pss counts them all."""
    if isinstance(server, CServer):
        want = server.processes
    elif isinstance(server, EpolldServer) and isinstance(server.workers, int):
        want = server.workers + 1 if server.workers > 1 else 1
    else:
        return
    deadline = time.monotonic() + 30
    while len(processes.tree_pids(proc.pid)) < want and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2 if want > 1 else 0)  # a worker's own start-up, after its fork


LOOP_MAXIMA = ("longest_turn_ms", "longest_deferred_cpu_ms")


def loop_figures(proc: subprocess.Popen[bytes], log: Path) -> dict[str, float]:
    """epolld's loop figures so far, of all its processes, from a new stats line (SIGUSR1):
    the largest longest_turn_ms and longest_deferred_cpu_ms of any process (per worker in
    the supervisor's line), and the sum of their slow_turns (turns over 100 ms)."""

    def stats_lines() -> list[dict[str, Any]]:
        out = []
        for line in log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                # The supervisor's line (or the single process's): a worker's names it.
                if (
                    isinstance(entry, dict)
                    and entry.get("event") == "stats"
                    and "worker" not in entry
                ):
                    out.append(entry)
        return out

    seen = len(stats_lines())
    os.kill(proc.pid, signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = stats_lines()
        if len(lines) > seen:
            entry = lines[-1]
            loops = [*entry.get("workers", []), entry]
            figures: dict[str, float] = {}
            for key in LOOP_MAXIMA:
                values = [float(x[key]) for x in loops if x.get(key) is not None]
                if values:
                    figures[key] = max(values)
            slow = [int(x["slow_turns"]) for x in loops if x.get("slow_turns") is not None]
            if slow:
                figures["slow_turns"] = sum(slow)
            return figures
        time.sleep(0.05)
    return {}


def _idle_memory(result: Result, extra: Result, workload: Workload) -> None:
    """RSS and Pss once the holders had established their connections, above start-up, per
    held connection: what an idle connection keeps (the peak includes what set-up used)."""
    if not workload.holders or extra.get("background_failed"):
        return
    established_rss, start_rss = (
        extra.get("server_established_rss_kib"),
        extra.get("server_start_rss_kib"),
    )
    if established_rss and start_rss:
        result["idle_rss_kib_per_conn"] = round((established_rss - start_rss) / workload.holders, 3)
    pss, start_pss = extra.get("server_pss_mib"), extra.get("server_start_pss_kib")
    if pss and start_pss:
        result["idle_pss_kib_per_conn"] = round((pss * 1024 - start_pss) / workload.holders, 3)


def _signal_handoff(proc: subprocess.Popen[bytes], after_s: float) -> None:
    """SIGUSR2 once the measured client has run for after_s (its pause shows as max_us)."""
    time.sleep(after_s)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGUSR2)


def _handoff_figures(result: Result, log: Path, conns: int) -> None:
    """handoff_complete from the server's log: the whole time and each step, per run and
    per connection (for the projection to more connections)."""
    complete = None
    worker_steps: dict[str, float] = {}
    for line in log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if not isinstance(entry, dict) or entry.get("event") != "handoff_complete":
                continue
            # With workers, the supervisor's line; each worker logs its own part too.
            if "worker" not in entry:
                complete = entry
                continue
            for step, seconds in (entry.get("steps") or {}).items():
                if step in WORKER_STEPS:
                    key = f"worker_{step}"
                    worker_steps[key] = max(worker_steps.get(key, 0.0), seconds)
    if complete is None:
        result["error_total"] = result.get("error_total", 0) + 1
        result.setdefault("errors", {})["no_handoff"] = 1
        return
    result["handoff_s"] = complete["duration_s"]
    result["handoff_conns"] = complete["connections"]
    steps = {**complete.get("steps", {}), **worker_steps}
    for step in HANDOFF_STEPS:
        if step in steps:
            result[f"handoff_{step}_s"] = steps[step]
            result[f"handoff_{step}_us_per_conn"] = round(steps[step] / max(1, conns) * 1e6, 2)


def _derive(result: Result, before: dict[str, list[int]], after: dict[str, list[int]]) -> None:
    """CPU per round trip, shares of the cores, from one measured client's result."""
    rt, cpu = result.get("round_trips"), result.get("server_cpu_s")
    result["cpu_s_per_m_rt"] = round(cpu / rt * 1e6, 3) if rt and cpu is not None else None
    user = result.get("server_user_s")
    result["user_share"] = round(user / cpu, 3) if cpu and user is not None else None
    busy, secs = result.get("watched_cpu_busy"), result.get("duration_s")
    if busy is not None and cpu is not None and secs:
        # The share of the server's core that went to something else (other processes,
        # unattributed softirq work): high values mean the run was disturbed.
        result["foreign_load"] = round(max(0.0, busy - cpu / secs), 3)
    if result.get("client_cpu_s") is not None and secs:
        result["client_share"] = round(result["client_cpu_s"] / secs, 3)
        if result.get("client_cpu_busy") is not None:
            # The same for the client's core: a slowed client changes the server's batching.
            result["client_foreign_load"] = round(
                max(0.0, result["client_cpu_busy"] - result["client_share"]), 3
            )
    result["cpu_busy"] = {
        name: round(1 - (after[name][1] - b[1]) / max(1, after[name][0] - b[0]), 3)
        for name, b in before.items()
    }


def _merge_background(result: Result, bg: list[Result], workload: Workload) -> None:
    """Add the background clients' errors and figures to the measured client's result."""
    if not bg:
        return
    errors = dict(result.get("errors") or {})
    for r in bg:
        result["error_total"] = result.get("error_total", 0) + r.get("error_total", 0)
        for key, n in (r.get("errors") or {}).items():
            errors[key] = errors.get(key, 0) + n
        if r.get("loadgen_failed"):
            errors["background_failed"] = errors.get("background_failed", 0) + 1
    firehoses = bg[: workload.firehoses]
    if firehoses:
        result["firehose_mb_per_s"] = round(sum(r.get("mb_per_s", 0) for r in firehoses), 1)
    holders = [r for r in bg[workload.firehoses :] if "t_begin_mono_s" in r]
    if holders:
        begin = min(r["t_begin_mono_s"] for r in holders)
        result["all_connected_s"] = round(max(r["t_connected_mono_s"] for r in holders) - begin, 4)
        result["all_echoing_s"] = round(max(r["t_probed_mono_s"] for r in holders) - begin, 4)
    if workload.holders_reprobe:
        result["reprobed"] = sum(r.get("reprobed", 0) for r in holders)
        result["reprobe_s"] = max((r.get("reprobe_s", 0) for r in holders), default=None)
    if workload.holders_expire:
        closed = sum(r.get("closed_by_server", 0) for r in holders)
        result["expired"] = closed
        firsts = [r["first_close_mono_s"] for r in holders if r.get("closed_by_server")]
        lasts = [r["last_close_mono_s"] for r in holders if r.get("closed_by_server")]
        if firsts:
            result["wave_s"] = round(max(lasts) - min(firsts), 4)
        # The wave must lie inside the measured client's interval, or its figure says nothing.
        start, end = result.get("measure_start_mono_s", 0), result.get("measure_end_mono_s", 0)
        missed = workload.holders - closed
        outside = bool(firsts) and (min(firsts) < start or max(lasts) > end)
        if missed or outside:
            errors["not_expired_in_window"] = missed if missed else 1
            result["error_total"] = result.get("error_total", 0) + errors["not_expired_in_window"]
    result["errors"] = errors


# ---------------------------------------------------------------- the matrix


def run_matrix(
    servers: dict[str, Server], workloads: list[Workload], opts: argparse.Namespace
) -> dict[str, Any]:
    """Every workload on each of its servers, `opts.reps` times, interleaved (A B C A B C)."""
    raw: dict[str, dict[str, list[Result]]] = {
        w.name: {s: [] for s in w.servers if s in servers} for w in workloads
    }
    unavailable: dict[str, str] = {}
    started = time.monotonic()
    for workload in workloads:
        names = list(raw[workload.name])
        # Repeats of disturbed runs may add at most a quarter to each workload's runs.
        retry_budget = len(names) * opts.reps // 4 if opts.retry else 0
        for rep in range(opts.reps):
            for name in names:
                if name in unavailable:
                    continue
                try:
                    for attempt in range(RETRIES + 1):
                        result = run_once(servers[name], workload, rep, opts)
                        result["attempt"] = attempt + 1
                        other = max(
                            result.get("foreign_load", 0), result.get("client_foreign_load", 0)
                        )
                        if other <= FOREIGN_MAX or retry_budget <= 0:
                            break
                        retry_budget -= 1
                        print(
                            f"  {name}: other load on the server's core"
                            f" {result.get('foreign_load', 0):.0%}, the client's"
                            f" {result.get('client_foreign_load', 0):.0%}; repeating",
                            flush=True,
                        )
                except Unavailable as e:
                    unavailable[name] = str(e)
                    print(f"  {name}: not available: {e}", flush=True)
                    continue
                raw[workload.name][name].append(result)
                print(
                    f"[{time.monotonic() - started:6.1f}s] {workload.name:15}"
                    f" rep {rep + 1}/{opts.reps} {name:18} {brief(result)}",
                    flush=True,
                )
    return {"raw": raw, "unavailable": unavailable, "wall_s": round(time.monotonic() - started, 1)}


def brief(r: Result) -> str:
    """One progress line per run."""
    lat = r.get("latency_us") or {}
    text = (
        f"rt/s {r.get('round_trips_per_s', 0):>10,.0f}  MB/s {r.get('mb_per_s', 0):>8,.1f}"
        f"  cpu/Mrt {r.get('cpu_s_per_m_rt') or 0:6.2f}  p50 {lat.get('p50', 0):7.0f}us"
        f"  p99 {lat.get('p99', 0):7.0f}us  rss {r.get('server_peak_rss_mib') or 0:5.1f}M"
    )
    if "firehose_mb_per_s" in r:
        text += f"  firehose {r['firehose_mb_per_s']:,.0f} MB/s"
    if "all_echoing_s" in r:
        text += (
            f"  echoing {r['all_echoing_s']:.3f}s  drops {r.get('listen_drops')}"
            f"  {r.get('rss_per_conn_kib', 0):.2f} KiB/conn"
        )
    if "expired" in r:
        text += (
            f"  expired {r['expired']} in {r.get('wave_s', 0):.3f}s  max {lat.get('max', 0):,.0f}us"
        )
    if "connect_all_s" in r and "all_echoing_s" not in r:
        text += f"  conn {r['connect_all_s']:.3f}s"
    return text + (
        f"  client {r.get('client_share') or 0:.0%}"
        f"  other {r.get('foreign_load', 0):.0%}/{r.get('client_foreign_load', 0):.0%}"
        f"  err {r.get('error_total')}"
    )


def _latency(key: str) -> Callable[[Result], Any]:
    return lambda r: (r.get("latency_us") or {}).get(key)


def _field(key: str) -> Callable[[Result], Any]:
    return lambda r: r.get(key)


METRICS: dict[str, Callable[[Result], Any]] = {  # summary key: how to get it from one run
    "round_trips_per_s": _field("round_trips_per_s"),
    "mb_per_s": _field("mb_per_s"),
    "cpu_s_per_m_rt": _field("cpu_s_per_m_rt"),
    "user_share": _field("user_share"),
    "p50_us": _latency("p50"),
    "p99_us": _latency("p99"),
    "p99_9_us": _latency("p99_9"),
    "max_us": _latency("max"),
    "peak_rss_mib": _field("server_peak_rss_mib"),
    "start_rss_mib": _field("server_start_rss_mib"),
    "rss_per_conn_kib": _field("rss_per_conn_kib"),
    "idle_rss_kib_per_conn": _field("idle_rss_kib_per_conn"),
    "idle_pss_kib_per_conn": _field("idle_pss_kib_per_conn"),
    "established_rss_mib": lambda r: (
        round(r["server_established_rss_kib"] / 1024, 2)
        if r.get("server_established_rss_kib")
        else None
    ),
    "pss_mib": _field("server_pss_mib"),
    "max_process_pss_mib": _field("server_max_process_pss_mib"),
    "connect_all_s": _field("connect_all_s"),
    "probe_all_s": _field("probe_all_s"),
    "all_connected_s": _field("all_connected_s"),
    "all_echoing_s": _field("all_echoing_s"),
    "firehose_mb_per_s": _field("firehose_mb_per_s"),
    "expired": _field("expired"),
    "wave_s": _field("wave_s"),
    "server_pipes": _field("server_pipes"),
    "listen_drops": _field("listen_drops"),
    "loss_ratio": _field("loss_ratio"),
    "client_busy": _field("client_share"),
    "server_cpu_busy": lambda r: (r.get("cpu_busy") or {}).get(f"cpu{processes.SERVER_CPU}"),
    "foreign_load": _field("foreign_load"),
    "client_foreign_load": _field("client_foreign_load"),
    "reprobed": _field("reprobed"),
    "reprobe_s": _field("reprobe_s"),
    "longest_turn_ms": _field("longest_turn_ms"),
    "longest_turn_before_ms": _field("longest_turn_before_ms"),
    "longest_deferred_cpu_ms": _field("longest_deferred_cpu_ms"),
    "longest_deferred_cpu_before_ms": _field("longest_deferred_cpu_before_ms"),
    "slow_turns_measured": _field("slow_turns_measured"),
    "handoff_s": _field("handoff_s"),
    "handoff_conns": _field("handoff_conns"),
    **{
        f"handoff_{step}_{unit}": _field(f"handoff_{step}_{unit}")
        for step in HANDOFF_STEPS
        for unit in ("s", "us_per_conn")
    },
}


def summarize(raw: dict[str, dict[str, list[Result]]]) -> dict[str, dict[str, Any]]:
    """Median, min and max of every metric per workload and server; errors are summed."""
    summary: dict[str, dict[str, Any]] = {}
    for wname, per_server in raw.items():
        summary[wname] = {}
        for sname, runs in per_server.items():
            if not runs:
                continue
            entry: dict[str, Any] = {
                "runs": len(runs),
                "errors": sum(r.get("error_total", 0) for r in runs),
            }
            kinds: dict[str, int] = {}
            for r in runs:
                for k, v in (r.get("errors") or {}).items():
                    kinds[k] = kinds.get(k, 0) + v
            entry["error_kinds"] = {k: v for k, v in kinds.items() if v}
            entry["io"] = sorted({r["io"] for r in runs if r.get("io")})
            entry["tls"] = sorted(
                {f"{r['tls_version']} {r['tls_cipher']}" for r in runs if r.get("tls_cipher")}
            )
            for key, get in METRICS.items():
                values = [v for v in map(get, runs) if v is not None]
                if values:
                    entry[key] = {
                        "median": statistics.median(values),
                        "min": min(values),
                        "max": max(values),
                    }
            summary[wname][sname] = entry
    return summary
