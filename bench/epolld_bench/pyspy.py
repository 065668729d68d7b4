"""--profile: py-spy stacks of epolld under 100 connections x 1 KiB ping-pong (or the
workload --profile-workload names, e.g. tls-pingpong), summarized."""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import time
from pathlib import Path
from typing import Any

from . import processes
from .bootstrap import sh
from .paths import OUT, ROOT, VENV
from .runner import loadgen_argv
from .servers import BY_NAME, start
from .workloads import BY_NAME as WORKLOADS


def profile(modes: list[str], opts: argparse.Namespace) -> None:
    """Record py-spy stacks of epolld under 100 conns x 1 KiB ping-pong and summarize them.

    The .raw file is in the collapsed-stack format that flamegraph.pl and speedscope read.
    """
    workload = WORKLOADS[opts.profile_workload]
    pyspy = VENV / "bin" / "py-spy"
    for mode in modes:
        server = BY_NAME.get(f"epolld-{mode}") or BY_NAME[mode]
        log = OUT / f"profile-{server.name}.log"
        proc, listening = start(server, workload, log)
        port = listening["port"]
        raw = OUT / f"profile-{server.name}.raw"
        try:
            warmup, duration = 1.0, opts.profile_seconds + 2
            gen = processes.spawn(
                loadgen_argv(
                    workload.load.args(),
                    port,
                    proc.pid,
                    warmup,
                    duration,
                    program=workload.load.program,
                ),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            time.sleep(1.0)
            cmd = [str(pyspy), "record", "--pid", str(proc.pid), "--rate", "500", "--duration",
                   str(int(opts.profile_seconds)), "--format", "raw",
                   "--output", str(raw)]  # fmt: skip
            # py-spy pauses the process per sample (its default): slower, but only then does
            # it reliably tell a thread waiting in epoll_wait (idle, dropped) from one working.
            if opts.native:
                cmd.append("--native")
            elif opts.nonblocking:
                cmd.append("--nonblocking")
            sh(cmd, stdout=subprocess.DEVNULL)
            stdout, _ = gen.communicate(timeout=warmup + duration + 40)
            processes.stop(gen)
            result = json.loads(stdout)
        finally:
            processes.stop(proc)
        text = summarize_profile(raw, server.name, result)
        (OUT / f"profile-{server.name}.txt").write_text(text)
        print(text)


def _source_line(frame: str) -> str:
    """The source text of a py-spy frame "func (path:line)", for the summary."""
    _, _, where = frame.rpartition(" (")
    path, _, line = where.rstrip(")").rpartition(":")
    if not line.isdigit():
        return ""
    for base in (ROOT, Path("/")):
        with contextlib.suppress(OSError, IndexError):
            return (base / path).read_text().splitlines()[int(line) - 1].strip()[:70]
    return ""


def summarize_profile(raw: Path, name: str, result: dict[str, Any]) -> str:
    """Self time per source line and per function, inclusive time per function."""
    self_line: dict[str, int] = {}
    self_func: dict[str, int] = {}
    incl_func: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        for func in {
            f.partition(" (")[0] + " (" + f.rpartition(" (")[2].rpartition(":")[0] + ")"
            for f in frames
        }:
            incl_func[func] = incl_func.get(func, 0) + count
        leaf = frames[-1]
        self_line[leaf] = self_line.get(leaf, 0) + count
        func = leaf.partition(" (")[0]
        self_func[func] = self_func.get(func, 0) + count
    cpu = result.get("server_cpu_s") or 0
    rt = result.get("round_trips") or 1
    lines = [
        f"py-spy profile of {name}: 100 connections x 1 KiB ping-pong,"
        f" {total} samples (idle excluded)",
        f"during profiling (slowed by sampling): {result.get('round_trips_per_s', 0):,.0f} rt/s,"
        f" {cpu / rt * 1e6:.2f} server CPU s per million round trips,"
        f" {100 * (result.get('server_user_s') or 0) / max(cpu, 1e-9):.0f}% of it in user space",
        "",
        "self time by source line (a line that makes a system call includes the kernel's time):",
    ]

    def pct(n: int) -> str:
        return f"{100 * n / max(1, total):5.1f}%"

    for frame, count in sorted(self_line.items(), key=lambda kv: -kv[1])[:20]:
        lines.append(f"  {pct(count)}  {frame}   {_source_line(frame)}")
    # Samples on lines that make no system call: where the interpreter's own time goes.
    syscall_words = ("send", "recv", "poll(", "accept", "splice", "close(")
    py_lines = {
        f: n for f, n in self_line.items() if not any(w in _source_line(f) for w in syscall_words)
    }
    py_total = sum(py_lines.values())
    lines += [
        "",
        f"lines without a system call ({100 * py_total / max(1, total):.1f}% of samples),"
        " as shares of those:",
    ]
    for frame, count in sorted(py_lines.items(), key=lambda kv: -kv[1])[:15]:
        lines.append(f"  {100 * count / max(1, py_total):5.1f}%  {frame}   {_source_line(frame)}")
    lines += ["", "self time by function:"]
    for func, count in sorted(self_func.items(), key=lambda kv: -kv[1])[:15]:
        lines.append(f"  {pct(count)}  {func}")
    lines += ["", "inclusive time by function:"]
    for func, count in sorted(incl_func.items(), key=lambda kv: -kv[1])[:20]:
        lines.append(f"  {pct(count)}  {func}")
    return "\n".join(lines) + "\n"
