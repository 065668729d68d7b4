"""Compiling the C programs and creating the bench venv when they are missing or stale."""

from __future__ import annotations

import contextlib
import resource
import shlex
import shutil
import subprocess
import sys
from typing import Any

from .paths import BENCH, BIN, ROOT, VENV, VENV_PY

C_PROGRAMS = ("loadgen", "echo_server", "udpgen", "udp_echo_server")


def sh(argv: list[str], **kwargs: Any) -> None:
    print("+", shlex.join(argv), flush=True)
    subprocess.run(argv, check=True, **kwargs)


def bootstrap(need_venv: bool = True) -> None:
    """Compile bench/*.c into bench/out/bin/, create bench/.venv, raise RLIMIT_NOFILE."""
    if shutil.which("gcc") is None:
        sh([str(ROOT / "packaging" / "dev" / "apt-install"), "gcc", "libc6-dev"])
    BIN.mkdir(parents=True, exist_ok=True)
    for name in C_PROGRAMS:
        src, exe = BENCH / f"{name}.c", BIN / name
        if not exe.exists() or exe.stat().st_mtime < src.stat().st_mtime:
            sh(["gcc", "-O2", "-Wall", "-Wextra", "-o", str(exe), str(src)])
    if need_venv:
        reqs = (BENCH / "requirements.txt").read_text()
        stamp = VENV / ".requirements"
        if not (stamp.exists() and stamp.read_text() == reqs):
            if not VENV_PY.exists():
                sh([sys.executable, "-m", "venv", str(VENV)])
            sh(
                [
                    str(VENV_PY),
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "-r",
                    str(BENCH / "requirements.txt"),
                ]
            )
            stamp.write_text(reqs)
    # Every server and load generator inherits the hard limit as its soft limit: the scale
    # workloads need all of it (20,000 on these machines, not raisable).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, hard), hard))


def nofile_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
