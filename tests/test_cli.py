"""The command line: version, help, and one clear line plus an exit code for user mistakes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from epolld import __version__

pytestmark = pytest.mark.slow


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "epolld", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_version_and_help() -> None:
    """--version prints the version; --help documents the options, signals and exit codes."""
    version = run("--version")
    assert version.returncode == 0
    assert version.stdout.strip() == f"epolld {__version__}"
    helptext = run("--help").stdout
    for word in ("--config", "--check-config", "--log-level", "--log-format", "SIGHUP", "78"):
        assert word in helptext


def test_console_script_is_installed() -> None:
    """The `epolld` console script next to the interpreter runs the same CLI."""
    script = Path(sys.executable).parent / "epolld"
    out = subprocess.run(
        [str(script), "--version"], capture_output=True, text=True, timeout=30, check=True
    )
    assert out.stdout.strip() == f"epolld {__version__}"


def test_bad_config_exits_78_without_traceback(tmp_path: Path) -> None:
    """An invalid file gives one line naming file and line on stderr, and exit code 78."""
    path = tmp_path / "bad.yaml"
    path.write_text("listen: ['127.0.0.1:0']\ntrigger: sideways\n")
    result = run("--config", str(path))
    assert result.returncode == os.EX_CONFIG == 78
    assert result.stderr.startswith(f"Error: {path}:2")
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_missing_config_exits_78(tmp_path: Path) -> None:
    """A missing file is a configuration error too, with the path in the message."""
    result = run("--config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 78
    assert str(tmp_path / "nope.yaml") in result.stderr


def test_address_in_use_names_it(tmp_path: Path) -> None:
    """A taken port exits 69 with a message naming the address and the reason."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        path = tmp_path / "epolld.yaml"
        path.write_text(f"listen: ['127.0.0.1:{port}']\n")
        result = run("--config", str(path))
    assert result.returncode == 69
    assert result.stderr.strip() == (
        f"Error: cannot listen on 127.0.0.1:{port}: address already in use "
        "(another process holds it)"
    )


def test_error_on_journal_stderr_has_error_priority(tmp_path: Path) -> None:
    """When stderr is the journal (JOURNAL_STREAM matches it), the error line carries <3>."""
    path = tmp_path / "bad.yaml"
    path.write_text("trigger: sideways\n")
    with open(tmp_path / "stderr", "w+") as stderr:
        st = os.fstat(stderr.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        code = subprocess.run(
            [sys.executable, "-m", "epolld", "--config", str(path)],
            stderr=stderr,
            env=env,
            timeout=30,
            check=False,
        ).returncode
        stderr.seek(0)
        text = stderr.read()
    assert code == 78
    assert text.startswith(f"<3>Error: {path}:1")
