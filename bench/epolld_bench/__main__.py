"""Benchmark epolld against a C epoll echo server, asyncio and uvloop (issues 6 and 9), and
its TLS echo against Go's crypto/tls, uvloop with ssl=, socat and ncat (issue 21).

Usage:
  bench/run --quick             a short subset; writes bench/out/quick.{md,json}
  bench/run --full              every workload, 5 repeats; writes docs/benchmarks.{md,json}
  bench/run --only fairness,scale --repeats 1
                                some workloads (names or groups), quick-sized unless --full;
                                writes bench/out/quick.* (or bench/out/partial.* with --full)
  bench/run --profile level     py-spy profile of epolld at 100 conns x 1 KiB ping-pong
  bench/run --profile level --profile-workload tls-pingpong     the same over TLS
  bench/run --report FILE.json  rewrite the Markdown report from saved raw results

The runner bootstraps what it needs: it compiles bench/*.c with the system gcc into
bench/out/bin/, and creates bench/.venv with uvloop and py-spy (bench/requirements.txt).
Every server runs pinned to CPU 0 in its own session, the load generators on CPU 1;
configurations are interleaved (A B C ... A B C ...) and each figure is the median of
the repeats with min-max. The primary figure is the server's CPU seconds (utime+stime
from /proc/PID/stat, read by the load generator at the start and end of the measured
interval) per million round trips. Only loopback traffic; every run is bounded in
time; only the processes this runner started are ever signalled, by process group.
See bench/README.md to add a workload or a baseline.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import processes, workloads
from .bootstrap import bootstrap, nofile_limit
from .machine import machine_info
from .paths import DOCS, OUT
from .pyspy import profile
from .report import render_markdown
from .runner import loadgen_argv, measured_seconds, run_matrix, summarize
from .servers import BY_NAME as SERVERS
from .servers import CServer, EpolldServer, display_argv
from .targets import evaluate


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    preset = p.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true", help="a short subset -> bench/out/quick.*")
    preset.add_argument("--full", action="store_true", help="everything -> docs/benchmarks.*")
    preset.add_argument("--profile", metavar="MODES", help="py-spy epolld: level,edge,splice")
    preset.add_argument("--report", metavar="JSON", help="rewrite the Markdown from saved results")
    p.add_argument(
        "--merge",
        metavar="PART_JSON",
        help="with --report: first replace the report's runs of PART_JSON's workloads by those"
        " (a later --full --only run); the report names that run",
    )
    p.add_argument("--servers", help="comma-separated subset of: " + ", ".join(SERVERS))
    p.add_argument(
        "--only",
        "--workloads",
        dest="only",
        metavar="NAMES",
        help="comma-separated workloads or groups (fairness, scale): "
        + ", ".join(w.name for w in workloads.WORKLOADS),
    )
    p.add_argument("--reps", "--repeats", dest="reps", type=int, help="quick 2, full 5")
    p.add_argument("--duration", type=float, help="measured seconds per run (quick 0.8, full 1.5)")
    p.add_argument("--warmup", type=float, help="warm-up seconds per run (quick 0.2, full 0.4)")
    p.add_argument(
        "--scale-conns",
        type=int,
        metavar="N",
        help=f"connections of the scale workloads (default {workloads.SCALE_CONNS:,}; the"
        " server needs N + 20 descriptors, the clients spread over processes)",
    )
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="run epolld with `workers: N` and the C server as N SO_REUSEPORT processes, only"
        " those (the 100,000-connection workload: --scale-conns 100000 --workers 6)",
    )
    p.add_argument(
        "--retry",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="repeat runs disturbed by other load (default: in --full only)",
    )
    p.add_argument("--output", help="base path for .md and .json (default by preset)")
    p.add_argument(
        "--server-cpus",
        default="0",
        help="taskset list the servers run on (default 0; e.g. 0-7 for workers: auto)",
    )
    p.add_argument(
        "--client-cpus", default="1", help="taskset list the load generators run on (default 1)"
    )
    p.add_argument("--profile-seconds", type=int, default=10)
    p.add_argument(
        "--profile-workload",
        default="pp-1k-c100",
        choices=[w.name for w in workloads.WORKLOADS if not w.holders and not w.udp],
        help="the load under --profile (default pp-1k-c100; tls-pingpong for TLS)",
    )
    p.add_argument("--native", action="store_true", help="py-spy --native (C frames too)")
    p.add_argument(
        "--nonblocking",
        action="store_true",
        help="py-spy --nonblocking: no pause per sample, but idle waits may be counted",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)  # also when started in the background
    try:
        return _main(opts)
    except KeyboardInterrupt:
        print("bench/run: interrupted; stopping the processes it started", file=sys.stderr)
        return 130
    except ValueError as e:
        print(f"bench/run: {e}", file=sys.stderr)
        return 2
    finally:
        processes.stop_all()


def _on_signal(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _main(opts: argparse.Namespace) -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    if opts.report:
        data = json.loads(Path(opts.report).read_text())
        if opts.merge:
            data = merge(data, json.loads(Path(opts.merge).read_text()))
            Path(opts.report).write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        Path(opts.report).with_suffix(".md").write_text(render_markdown(data))
        return 0
    bootstrap()
    processes.use_cpus(opts.server_cpus, opts.client_cpus)
    os.sched_setaffinity(0, {processes.CLIENT_CPU})  # keep the runner off the server's core
    if opts.profile:
        profile(opts.profile.split(","), opts)
        return 0
    full = opts.full
    opts.retry = full if opts.retry is None else opts.retry
    opts.reps = opts.reps or (5 if full else 2)
    opts.duration = opts.duration or (1.5 if full else 0.8)
    opts.warmup = opts.warmup if opts.warmup is not None else (0.4 if full else 0.2)
    chosen = workloads.select(opts.only, quick=not full, scale_conns=opts.scale_conns)
    if opts.servers:
        unknown = set(opts.servers.split(",")) - set(SERVERS)
        if unknown:
            raise ValueError(f"unknown servers: {', '.join(sorted(unknown))}")
    servers = {n: s for n, s in SERVERS.items() if not opts.servers or n in opts.servers.split(",")}
    if opts.workers:
        servers = with_processes(servers, opts.workers)
    _check_descriptors(chosen, opts.workers or 1)
    if opts.output:
        base = Path(opts.output)
    elif not full:
        base = OUT / "quick"
    else:  # a partial --full run must not overwrite the published report
        base = OUT / "partial" if opts.only or opts.servers else DOCS / "benchmarks"
    base.parent.mkdir(parents=True, exist_ok=True)
    print(f"about {estimate_s(chosen, servers, opts) / 60:.0f} min", flush=True)
    data = run_matrix(servers, chosen, opts)
    data["summary"] = summarize(data["raw"])
    data["machine"] = machine_info()
    data["options"] = {
        "preset": "--full" if full else "--quick",
        "reps": opts.reps,
        "duration": opts.duration,
        "warmup": opts.warmup,
        "servers": [s for s in servers if any(s in w.servers for w in chosen)],
        "workloads": [w.name for w in chosen],
        "json_name": base.with_suffix(".json").name,
        "retry": opts.retry,
        "scale_conns": opts.scale_conns or workloads.SCALE_CONNS,
        "workers": opts.workers or 1,
    }
    if opts.only:
        data["options"]["preset"] += f" --only {opts.only}"
    data["titles"] = {w.name: w.heading for w in chosen}
    data["server_titles"] = {n: s.title for n, s in servers.items()}  # --workers renames
    data["background"] = {w.name: _background_text(w) for w in chosen if w.background()}
    data["targets"] = evaluate(data["summary"], data["raw"])
    example = workloads.BY_NAME["pp-1k-c100"]
    data["commands"] = {
        "servers": {n: display_argv(s, example) for n, s in servers.items()},
        "loadgen": {
            w.name: loadgen_argv(
                w.load.args(), 0, 0, opts.warmup, measured_seconds(w, opts), program=w.load.program
            )
            for w in chosen
        },
    }
    base.with_suffix(".json").write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    base.with_suffix(".md").write_text(render_markdown(data))
    print(
        f"wrote {base.with_suffix('.md')} and {base.with_suffix('.json')} in {data['wall_s']:.0f} s"
    )
    errors = sum(e["errors"] for per in data["summary"].values() for e in per.values())
    return 1 if errors else 0


def merge(data: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    """The report data with the workloads of a later partial run (--full --only) put in its
    place; data["merged"] says which run each came from."""
    names = part["options"]["workloads"]
    for key in ("raw", "summary", "titles", "background"):
        data.setdefault(key, {}).update({n: part[key][n] for n in names if n in part.get(key, {})})
    data["commands"]["loadgen"].update(part["commands"]["loadgen"])
    data["commands"]["servers"].update(part["commands"]["servers"])
    data["options"]["workloads"] += [n for n in names if n not in data["options"]["workloads"]]
    data["options"]["servers"] += [
        s for s in part["options"]["servers"] if s not in data["options"]["servers"]
    ]
    data.setdefault("merged", []).append(
        {
            "workloads": names,
            "preset": part["options"]["preset"],
            "reps": part["options"]["reps"],
            "date_utc": part["machine"]["date_utc"],
            "epolld_commit": part["machine"]["epolld_commit"],
            "wall_s": part["wall_s"],
        }
    )
    data["targets"] = evaluate(data["summary"], data["raw"])
    return data


def _background_text(w: workloads.Workload) -> str:
    """The background clients of a workload, for the report."""
    runs = w.background()
    first = " ".join(runs[0])
    if w.firehoses:
        return f"{w.firehoses} firehoses, each `loadgen --hold-stdin {first}`"
    plural = "es" if len(runs) > 1 else ""
    program = w.load.program
    return f"{len(runs)} holder process{plural}, the first `{program} --hold-stdin {first}`"


def with_processes(servers: dict[str, Any], n: int) -> dict[str, Any]:
    """--workers N: epolld with `workers: N` and the C server as N SO_REUSEPORT processes,
    under their usual names (so that the targets apply); the servers that cannot spread
    their connections over processes are left out."""
    out: dict[str, Any] = {}
    for name, server in servers.items():
        if isinstance(server, CServer):
            title = f"C epoll, {n} SO_REUSEPORT processes (bench/echo_server.c --processes {n})"
            out[name] = dataclasses.replace(server, processes=n, title=title)
        elif isinstance(server, EpolldServer) and server.workers == 1:
            title = f"{server.title}, workers: {n}"
            out[name] = dataclasses.replace(server, workers=n, title=title)
    if not out:
        raise ValueError("--workers: none of the chosen servers runs more than one process")
    SERVERS.update(out)  # the report's rows take these titles
    return out


def _check_descriptors(chosen: list[workloads.Workload], processes: int = 1) -> None:
    """A scale workload larger than the descriptor limit fails up front, with the reason.

    Raises:
        ValueError: the server could not hold the workload's connections.
    """
    limit = nofile_limit()
    for w in chosen:
        each = -(-w.conns // processes)  # SO_REUSEPORT spreads them about evenly
        slack = 0.95 if processes > 1 else 1.0  # the 4-tuple hash is not exactly even
        if each + 20 > limit * slack:
            raise ValueError(
                f"{w.name}: {w.conns:,} connections need about {each + 20:,} descriptors in"
                f" each of {processes} server processes, RLIMIT_NOFILE is {limit:,}"
                " (ulimit -Hn); use --scale-conns, or --workers"
            )


def estimate_s(
    chosen: list[workloads.Workload], servers: Mapping[str, object], opts: argparse.Namespace
) -> float:
    """A rough wall time: per run the measured time, the warm-up and ~0.4 s of start and stop,
    plus ~1 s per 10,000 connections to establish and close, ~15 s per 10,000 TLS ones (a
    full handshake each); retries not counted."""
    total = 0.0
    for w in chosen:
        runs = sum(1 for s in w.servers if s in servers) * opts.reps
        per_conn = 1.5e-3 if w.tls else 1e-4
        per = opts.warmup + measured_seconds(w, opts) + 0.4 + w.conns * per_conn
        total += runs * per
    return total


if __name__ == "__main__":
    sys.exit(main())
