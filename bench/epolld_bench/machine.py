"""What the report says about the machine and the software versions."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from .bootstrap import nofile_limit
from .paths import ROOT, VENV_PY


def _output(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info() -> dict[str, Any]:
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    epolld_py = ROOT / ".venv" / "bin" / "python"
    return {
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "os": _output(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "python_epolld": _output([str(epolld_py), "-VV"]) if epolld_py.exists() else "missing",
        "python_bench": _output([str(VENV_PY), "-VV"]),
        "uvloop": _output([str(VENV_PY), "-c", "import uvloop; print(uvloop.__version__)"]),
        "gcc": _output(["gcc", "--version"]).splitlines()[0],
        "epolld_commit": _output(["git", "-C", str(ROOT), "describe", "--always", "--dirty"]),
        "nofile_limit": nofile_limit(),
        "somaxconn": Path("/proc/sys/net/core/somaxconn").read_text().strip(),
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
