"""`epolld --check-config` and `--print-config` as a real subprocess: output and exit codes."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
import sys

from epolld.config import Config, describe, load_config

SHIPPED = pathlib.Path(__file__).resolve().parent.parent / "etc" / "epolld.yaml"
EX_CONFIG = 78
TIMEOUT_S = 60  # a check is quick; this only stops a hung child


def epolld(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m epolld ARGS` outside systemd and return what it did."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "LISTEN_"))}
    return subprocess.run(
        [sys.executable, "-m", "epolld", *args],
        capture_output=True, text=True, timeout=TIMEOUT_S, env=env, check=False,
    )  # fmt: skip


def test_check_config_ok() -> None:
    """--check-config on the shipped file prints "configuration OK" and the summary, exit 0."""
    result = epolld("--check-config", "--config", str(SHIPPED))
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == f"configuration OK: {describe(Config())}\n"


def test_check_config_unknown_option(tmp_path: pathlib.Path) -> None:
    """An invalid file exits 78 with one "Error: file:line: ..." line and no traceback."""
    path = tmp_path / "epolld.yaml"
    path.write_text("limits:\n  idle_timout: 5s\n", encoding="utf-8")
    result = epolld("--check-config", "--config", str(path))
    assert (result.returncode, result.stdout) == (EX_CONFIG, "")
    assert result.stderr == (
        f"Error: {path}:2: unknown option 'idle_timout' in limits (did you mean 'idle_timeout'?)\n"
    )


def test_check_config_syntax_error(tmp_path: pathlib.Path) -> None:
    """A YAML syntax error exits 78 with line, column and the offending line, on one line."""
    path = tmp_path / "epolld.yaml"
    path.write_text("backlog: 5\n  trigger: edge\n", encoding="utf-8")
    result = epolld("--check-config", "--config", str(path))
    assert result.returncode == EX_CONFIG
    assert result.stderr == (
        f"Error: {path}:2:10: mapping values are not allowed here, in '  trigger: edge'\n"
    )


def test_check_config_missing_file(tmp_path: pathlib.Path) -> None:
    """A missing file exits 78 naming it."""
    path = tmp_path / "absent.yaml"
    result = epolld("--check-config", "--config", str(path))
    assert (result.returncode, result.stderr) == (EX_CONFIG, f"Error: {path}: no such file\n")


def test_print_config_round_trips(tmp_path: pathlib.Path) -> None:
    """--print-config prints every setting, defaults filled in, as YAML that loads back equal."""
    path = tmp_path / "epolld.yaml"
    path.write_text("trigger: edge\nlimits:\n  idle_timeout: 90s\n", encoding="utf-8")
    result = epolld("--print-config", "--config", str(path))
    assert (result.returncode, result.stderr) == (0, "")
    assert "max_connections: 10000\n" in result.stdout  # a default, filled in
    printed = tmp_path / "printed.yaml"
    printed.write_text(result.stdout, encoding="utf-8")
    assert load_config(str(printed)) == dataclasses.replace(
        load_config(str(path)), source=str(printed)
    )


def test_print_config_invalid_file(tmp_path: pathlib.Path) -> None:
    """--print-config of an invalid file prints nothing on stdout and exits 78."""
    path = tmp_path / "epolld.yaml"
    path.write_text("backlog: yes\n", encoding="utf-8")
    result = epolld("--print-config", "--config", str(path))
    assert (result.returncode, result.stdout) == (EX_CONFIG, "")
    assert result.stderr == (
        f"Error: {path}:1: backlog: expected a positive integer, got a boolean (yes)\n"
    )
