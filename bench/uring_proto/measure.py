"""Measure the io_uring prototype against the C epoll server and epolld level (issue 25).

Usage: bench/uring_proto/run [--quick] [--reps N] [--duration S] [--no-callgrind]

CPU per round trip: the bench harness's runs (bench/epolld_bench/runner.run_once: a fresh
server pinned to CPU 0 at nice -10, bench/loadgen.c pinned to CPU 1, the server's
utime+stime from /proc/PID/stat over the measured interval), ping-pong at 64 B and 1 KiB
over 1, 10 and 100 connections. Paired and interleaved: every repeat runs each workload on
the three servers back to back, in an order rotated per repeat, and the uring/C ratio is
taken within each such pair before the median. Completions per io_uring_enter come from
the prototype's own counters (its stats line on SIGTERM, whole run including the warm-up).

Instructions per round trip (--callgrind, on unless --no-callgrind): each server under
valgrind --tool=callgrind twice, loadgen doing SHORT and then LONG round trips; the
difference of the two totals over the difference of the round trips (as bench/callgrind_rt.py).
User space only: callgrind does not see the kernel.

Writes bench/out/uring.json and bench/out/uring.md; only loopback, every run bounded in time,
only the processes started here are signalled (by process group).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from epolld_bench import processes  # noqa: E402
from epolld_bench.bootstrap import bootstrap  # noqa: E402
from epolld_bench.machine import machine_info  # noqa: E402
from epolld_bench.paths import BIN, OUT, ROOT  # noqa: E402
from epolld_bench.runner import FOREIGN_MAX, run_once  # noqa: E402
from epolld_bench.servers import BY_NAME, Server, Unavailable  # noqa: E402
from epolld_bench.workloads import KIB, Load, Workload  # noqa: E402

PYTHON = ROOT / ".venv" / "bin" / "python"  # the interpreter epolld runs on (3.11 here)
SERVER_NAMES = ("c-epoll", "uring-proto", "epolld-level")
SIZES = (64, KIB)
CONNS = (1, 10, 100)
CALLGRIND_RT = {1: (2_000, 12_000), 100: (4_000, 24_000)}  # conns: (SHORT, LONG)


@dataclasses.dataclass(frozen=True)
class UringServer(Server):
    """bench/uring_proto/echo.py on the interpreter epolld uses."""

    def command(self, workload: Workload) -> list[str]:
        return [str(PYTHON), str(HERE / "echo.py"), "--port", "0", "--backlog", "511"]


SERVERS: dict[str, Server] = {
    "c-epoll": BY_NAME["c-epoll"],
    "uring-proto": UringServer("uring-proto", "io_uring prototype (bench/uring_proto/echo.py)"),
    "epolld-level": BY_NAME["epolld-level"],
}


def workloads() -> list[Workload]:
    return [
        Workload(
            f"pp-{'1k' if size == KIB else size}-c{conns}",
            f"ping-pong {size} B, {conns} connections",
            Load(conns=conns, size=size),
            servers=SERVER_NAMES,
        )
        for size in SIZES
        for conns in CONNS
    ]


def stats_line(workload: Workload, server: str, rep: int) -> dict[str, Any] | None:
    """The prototype's {"event": "stats"} line from the run's log."""
    log = OUT / "logs" / f"{workload.name}.{server}.{rep}.log"
    for line in log.read_text(errors="replace").splitlines():
        if '"stats"' in line:
            stats: dict[str, Any] = json.loads(line)
            return stats
    return None


def run_pairs(opts: argparse.Namespace) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Every workload on the three servers back to back, opts.reps times."""
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {}
    started = time.monotonic()
    for rep in range(opts.reps):
        for workload in workloads():
            per = raw.setdefault(workload.name, {name: [] for name in SERVER_NAMES})
            order = SERVER_NAMES[rep % 3 :] + SERVER_NAMES[: rep % 3]
            for name in order:
                for attempt in range(2):  # one repeat of a run disturbed by other load
                    try:
                        result = run_once(SERVERS[name], workload, rep, opts)
                    except Unavailable as e:
                        raise SystemExit(f"{name}: not available: {e}") from e
                    result["attempt"] = attempt + 1
                    other = max(result.get("foreign_load", 0), result.get("client_foreign_load", 0))
                    if other <= FOREIGN_MAX:
                        break
                if name == "uring-proto":
                    stats = stats_line(workload, name, rep)
                    if stats and stats.get("enters"):
                        result["cqes_per_enter"] = round(stats["cqes"] / stats["enters"], 2)
                        result["uring_stats"] = stats
                per[name].append(result)
                print(
                    f"[{time.monotonic() - started:6.1f}s] rep {rep + 1}/{opts.reps}"
                    f" {workload.name:11} {name:13}"
                    f" cpu/Mrt {result.get('cpu_s_per_m_rt') or 0:6.2f}"
                    f"  user {result.get('user_share') or 0:4.0%}"
                    f"  rt/s {result.get('round_trips_per_s', 0):>9,.0f}"
                    f"  cqe/enter {result.get('cqes_per_enter', '-')}"
                    f"  other {result.get('foreign_load', 0):.0%}"
                    f"/{result.get('client_foreign_load', 0):.0%}  err {result.get('error_total')}",
                    flush=True,
                )
    return raw


def _med(values: list[float]) -> dict[str, float] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(raw: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """Medians per workload and server, and the paired ratios to the C server."""
    out: dict[str, Any] = {}
    for wname, per in raw.items():
        entry: dict[str, Any] = {}
        for name, runs in per.items():
            cpu = [r.get("cpu_s_per_m_rt") for r in runs]
            user = [
                r["server_user_s"] / r["round_trips"] * 1e6
                for r in runs
                if r.get("server_user_s") is not None and r.get("round_trips")
            ]
            entry[name] = {
                "runs": len(runs),
                "errors": sum(r.get("error_total", 0) for r in runs),
                "cpu_s_per_m_rt": _med(cpu),
                "user_s_per_m_rt": _med(user),
                "kernel_s_per_m_rt": _med(
                    [
                        c - u
                        for c, u in zip(cpu, user, strict=False)
                        if c is not None and u is not None
                    ]
                ),
                "round_trips_per_s": _med([r.get("round_trips_per_s") for r in runs]),
                "p50_us": _med([(r.get("latency_us") or {}).get("p50") for r in runs]),
                "foreign_load": _med([r.get("foreign_load") for r in runs]),
                "client_foreign_load": _med([r.get("client_foreign_load") for r in runs]),
                "cqes_per_enter": _med([r.get("cqes_per_enter") for r in runs]),
            }
        c_runs = per["c-epoll"]
        for name in ("uring-proto", "epolld-level"):
            ratios = [
                r["cpu_s_per_m_rt"] / c["cpu_s_per_m_rt"]
                for r, c in zip(per[name], c_runs, strict=False)
                if r.get("cpu_s_per_m_rt") and c.get("cpu_s_per_m_rt")
            ]
            entry[name]["paired_ratio_to_c"] = _med(ratios)
        ratios = [
            u["cpu_s_per_m_rt"] / e["cpu_s_per_m_rt"]
            for u, e in zip(per["uring-proto"], per["epolld-level"], strict=False)
            if u.get("cpu_s_per_m_rt") and e.get("cpu_s_per_m_rt")
        ]
        entry["uring-proto"]["paired_ratio_to_level"] = _med(ratios)
        out[wname] = entry
    return out


# ---------------------------------------------------------------- callgrind


def callgrind_argv(name: str, tmp: Path) -> list[str]:
    if name == "c-epoll":
        return [str(BIN / "echo_server"), "--port", "0"]
    if name == "uring-proto":
        return [str(PYTHON), str(HERE / "echo.py"), "--port", "0", "--once"]
    cfg = tmp / "epolld.yaml"
    cfg.write_text(
        'listen: ["127.0.0.1:0"]\ntrigger: level\nlogging: {level: info, format: json}\n'
        "watchdog: false\nstats_interval: 0s\n"
    )
    return [str(PYTHON), "-m", "epolld", "--config", str(cfg)]


def callgrind_once(
    name: str, conns: int, size: int, round_trips: int, tmp: Path
) -> tuple[int, int]:
    """(instructions, round trips) of one server run under callgrind."""
    out = tmp / f"callgrind.{name}.{conns}.{size}.{round_trips}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("NOTIFY_SOCKET", None)
    argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
    proc = processes.spawn(
        argv + callgrind_argv(name, tmp),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        cwd=tmp,
    )
    try:
        assert proc.stdout is not None
        port = 0
        deadline = time.monotonic() + 120
        while not port and time.monotonic() < deadline:
            line = proc.stdout.readline().decode(errors="replace")
            if not line:
                raise SystemExit(f"{name} exited under valgrind before listening")
            if '"listening"' in line:
                port = int(json.loads(line)["address"].rsplit(":", 1)[1])
        gen = subprocess.run(
            [str(BIN / "loadgen"), "--port", str(port), "--mode", "pingpong",
             "--conns", str(conns), "--size", str(size), "--warmup", "0", "--duration", "300",
             "--max-round-trips", str(round_trips), "--stall-timeout", "60",
             "--connect-timeout", "60", "--drain-timeout", "60"],
            capture_output=True, timeout=400, check=False,
        )  # fmt: skip
        result = json.loads(gen.stdout)
        if result.get("error_total"):
            raise SystemExit(f"{name} under callgrind: loadgen errors {result.get('errors')}")
        if name != "uring-proto":  # it exits by itself (--once)
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        processes.stop(proc)
    for line in out.read_text(errors="replace").splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1]), int(result["round_trips"])
    raise SystemExit(f"no summary line in {out}")


def callgrind_all() -> dict[str, dict[str, float]]:
    """Instructions per round trip: server -> workload -> figure."""
    figures: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for conns, (short, long) in CALLGRIND_RT.items():
            for size in SIZES:
                wname = f"pp-{'1k' if size == KIB else size}-c{conns}"
                for name in SERVER_NAMES:
                    i0, r0 = callgrind_once(name, conns, size, short, tmp)
                    i1, r1 = callgrind_once(name, conns, size, long, tmp)
                    per_rt = (i1 - i0) / (r1 - r0)
                    figures.setdefault(name, {})[wname] = round(per_rt)
                    print(f"callgrind {wname:11} {name:13} {per_rt:10,.0f} instructions/rt")
    return figures


# ---------------------------------------------------------------- report


def _fmt(m: dict[str, float] | None, digits: int = 2, ratio: bool = False) -> str:
    if not m:
        return "-"
    suffix = "x" if ratio else ""
    return f"{m['median']:.{digits}f}{suffix} ({m['min']:.{digits}f}-{m['max']:.{digits}f})"


def render(data: dict[str, Any]) -> str:
    s, opts = data["summary"], data["options"]
    lines = [
        f"# io_uring prototype vs C epoll ({data['machine']['date_utc']})",
        "",
        f"`bench/uring_proto/run {opts['argv']}`: {opts['reps']} paired repeats,"
        f" {opts['duration']} s measured + {opts['warmup']} s warm-up per run;"
        f" kernel {data['machine']['kernel']}, {data['machine']['cpu_model']}.",
        "CPU s per million round trips, median (min-max); ratios are paired within a repeat.",
        "",
        "| Workload | C epoll | uring proto | epolld level | uring/C | level/C | uring/level"
        " | completions/enter |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for wname, e in s.items():
        u = e["uring-proto"]
        lines.append(
            f"| {wname} | {_fmt(e['c-epoll']['cpu_s_per_m_rt'])} | {_fmt(u['cpu_s_per_m_rt'])}"
            f" | {_fmt(e['epolld-level']['cpu_s_per_m_rt'])}"
            f" | {_fmt(u['paired_ratio_to_c'], ratio=True)}"
            f" | {_fmt(e['epolld-level']['paired_ratio_to_c'], ratio=True)}"
            f" | {_fmt(u['paired_ratio_to_level'], ratio=True)}"
            f" | {_fmt(u['cqes_per_enter'], 1)} |"
        )
    lines += [
        "",
        "User and kernel CPU s per million round trips (medians), other load on the server's"
        " core / the client's core (median, max over the three servers' runs):",
        "",
        "| Workload | C user / kernel | uring user / kernel | level user / kernel | other load |",
        "|---|---|---|---|---|",
    ]
    for wname, e in s.items():
        cells = []
        for name in SERVER_NAMES:
            user, kern = e[name]["user_s_per_m_rt"], e[name]["kernel_s_per_m_rt"]
            cells.append(f"{user['median']:.2f} / {kern['median']:.2f}" if user and kern else "-")
        fl = [e[n]["foreign_load"] for n in SERVER_NAMES if e[n]["foreign_load"]]
        cl = [e[n]["client_foreign_load"] for n in SERVER_NAMES if e[n]["client_foreign_load"]]
        noise = (
            f"{statistics.median(f['median'] for f in fl):.0%}"
            f" (max {max(f['max'] for f in fl):.0%})"
            f" / {statistics.median(c['median'] for c in cl):.0%}"
            f" (max {max(c['max'] for c in cl):.0%})"
            if fl and cl
            else "-"
        )
        lines.append(f"| {wname} | {' | '.join(cells)} | {noise} |")
    errors = sum(e[n]["errors"] for e in s.values() for n in SERVER_NAMES)
    lines += ["", f"Errors (loadgen verifies every byte): {errors}."]
    cg = data.get("callgrind")
    if cg:
        lines += [
            "",
            "Callgrind, user-space instructions per round trip (difference of two runs):",
            "",
            "| Workload | C epoll | uring proto | epolld level | uring/level |",
            "|---|---|---|---|---|",
        ]
        for wname in cg["uring-proto"]:
            c, u, lv = (cg[n][wname] for n in SERVER_NAMES)
            lines.append(f"| {wname} | {c:,} | {u:,} | {lv:,} | {u / lv:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/uring_proto/run", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="3 repeats of 0.8 s, no callgrind")
    p.add_argument("--reps", type=int, help="paired repeats (quick 3, default 5)")
    p.add_argument("--duration", type=float, help="measured seconds (quick 0.8, default 1.5)")
    p.add_argument("--warmup", type=float, help="warm-up seconds (quick 0.2, default 0.4)")
    p.add_argument("--no-callgrind", action="store_true")
    p.add_argument("--callgrind-only", action="store_true")
    p.add_argument("--output", type=Path, default=OUT / "uring")
    opts = p.parse_args(argv)
    opts.argv = " ".join(sys.argv[1:] if argv is None else argv)
    opts.reps = opts.reps or (3 if opts.quick else 5)
    opts.duration = opts.duration or (0.8 if opts.quick else 1.5)
    opts.warmup = opts.warmup if opts.warmup is not None else (0.2 if opts.quick else 0.4)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    bootstrap(need_venv=False)
    processes.use_cpus("0", "1")
    os.sched_setaffinity(0, {processes.CLIENT_CPU})
    data: dict[str, Any] = {"machine": machine_info(), "options": vars(opts) | {"output": ""}}
    try:
        if not opts.callgrind_only:
            data["raw"] = run_pairs(opts)
            data["summary"] = summarize(data["raw"])
        if not (opts.quick or opts.no_callgrind):
            data["callgrind"] = callgrind_all()
    finally:
        processes.stop_all()
    opts.output.parent.mkdir(parents=True, exist_ok=True)
    opts.output.with_suffix(".json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    if "summary" in data:
        opts.output.with_suffix(".md").write_text(render(data))
        print(render(data))
    elif "callgrind" in data:
        print(json.dumps(data["callgrind"], indent=1))
    return 0
