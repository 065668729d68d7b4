"""The `workers:` option: its forms, its errors, auto, and what a reload may change."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from epolld.config import Config, load_config, render_config, worker_count
from epolld.errors import ConfigError


def write(tmp_path: pathlib.Path, text: str) -> str:
    path = tmp_path / "epolld.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(("text", "expected"), [("", 1), ("workers: 1\n", 1), ("workers: 4\n", 4)])
def test_workers_number(tmp_path: pathlib.Path, text: str, expected: int) -> None:
    """workers is a positive integer, 1 by default."""
    config = load_config(write(tmp_path, text))
    assert config.workers == expected
    assert worker_count(config) == expected


def test_workers_auto_is_one_per_usable_cpu(tmp_path: pathlib.Path) -> None:
    """workers: auto is one per CPU in this process's affinity mask, not per CPU installed."""
    config = load_config(write(tmp_path, "workers: auto\n"))
    assert config.workers == "auto"
    assert worker_count(config) == len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "expected a positive integer or auto"),
        ("-2", "expected a positive integer or auto"),
        ("true", "expected a positive integer or auto"),
        ("'4'", "expected a positive integer or auto"),
        ("2.0", "expected a positive integer or auto"),
        ("Auto", "expected a positive integer or auto"),
        ("1025", "must be at most 1024"),
    ],
)
def test_workers_errors(tmp_path: pathlib.Path, value: str, message: str) -> None:
    """A bad workers value is a configuration error that names the key and its line."""
    with pytest.raises(ConfigError, match=message) as info:
        load_config(write(tmp_path, f"backlog: 64\nworkers: {value}\n"))
    assert ":2:" in str(info.value)
    assert "workers" in str(info.value)


@pytest.mark.parametrize("workers", [1, 3, "auto"])
def test_print_config_round_trips_workers(tmp_path: pathlib.Path, workers: object) -> None:
    """render_config() writes workers so that loading it gives the same value back."""
    path = tmp_path / "rendered.yaml"
    path.write_text(render_config(Config(workers=workers)))  # type: ignore[arg-type]
    assert load_config(str(path)).workers == workers


def test_check_config_names_the_workers(tmp_path: pathlib.Path) -> None:
    """--check-config's summary says how many workers were asked for."""
    path = write(tmp_path, "listen: ['127.0.0.1:0']\nworkers: auto\n")
    out = subprocess.run(
        [sys.executable, "-m", "epolld", "--check-config", "--config", path],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "workers: auto" in out
