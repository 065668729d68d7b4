"""What the callgrind scripts share (callgrind_rt.py, callgrind_udp.py, callgrind_udp_event.py):
the daemon under `valgrind --tool=callgrind` and the total its run counted.

Each run's total includes start-up and shutdown, so a script runs twice (SHORT then LONG
units of work) and divides the difference of the totals by the difference of the units:
start-up, imports and shutdown cancel out. Callgrind counts user-space instructions only,
deterministic to a fraction of a percent where CPU time on this noisy machine is not.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

START_TIMEOUT_S = 120  # valgrind starts the interpreter some 50 times slower
QUIET = "logging: {level: info, format: json}\nwatchdog: false\nstats_interval: 0s\n"


def instructions(out: Path) -> int:
    """The total of a callgrind output file (its `summary:` or `totals:` line)."""
    for line in out.read_text(errors="replace").splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise SystemExit(f"no summary line in {out}")


def run_daemon(
    config: str,
    tmp: Path,
    name: str,
    src: Path,
    exercise: Callable[[int], None],
    prefix: Sequence[str] = (),
) -> int:
    """Run the epolld of src under callgrind, exercise it, stop it; its instructions.

    Args:
        config: the configuration's settings; QUIET's lines are added (JSON logs, no
            watchdog, no stats lines).
        tmp: where the configuration and the callgrind output go.
        name: tells this run's output file from the other's.
        src: the checkout whose epolld runs (PYTHONPATH), with this interpreter.
        exercise: called with the port of the first listener once it listens.
        prefix: a command that execs the rest (tests/seccomp_exec.py, say).

    Raises:
        SystemExit: the daemon exited before listening, or left no total.
    """
    cfg = tmp / "epolld.yaml"
    cfg.write_text(config + QUIET)
    out = tmp / f"callgrind.{name}"
    env = {**os.environ, "PYTHONPATH": str(src)}
    env.pop("NOTIFY_SOCKET", None)
    valgrind = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
    proc = subprocess.Popen(
        [*prefix, *valgrind, sys.executable, "-m", "epolld", "--config", str(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
        cwd=tmp,  # -m puts the working directory first on sys.path, before PYTHONPATH
    )
    try:
        exercise(_listening_port(proc))
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=START_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return instructions(out)


def _listening_port(proc: subprocess.Popen[bytes]) -> int:
    assert proc.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise SystemExit("epolld exited before listening")
        record = json.loads(line)
        if record.get("event") == "listening":
            return int(record["address"].rsplit(":", 1)[1])
    raise SystemExit(f"epolld did not listen within {START_TIMEOUT_S} s")
