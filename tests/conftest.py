"""Fixtures: the daemon as a real subprocess in every trigger mode, on port 0."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.epolld_process import Daemon, write_config

# Every engine test runs in each of these modes (the issue: "the whole test
# suite runs in both modes").
MODES = {
    "level": {"trigger": "level"},
    "edge": {"trigger": "edge"},
    "level-splice": {"trigger": "level", "io": "splice"},
    "edge-splice": {"trigger": "edge", "io": "splice"},
}


@pytest.fixture(params=list(MODES))
def mode(request: pytest.FixtureRequest) -> dict[str, Any]:
    return dict(MODES[request.param])


StartDaemon = Callable[..., Daemon]


@pytest.fixture
def start_daemon(tmp_path: Path, mode: dict[str, Any]) -> Iterator[StartDaemon]:
    """Start epolld with the mode's settings plus overrides; stop it at teardown.

    Teardown also checks that every line the daemon logged was JSON.
    """
    started: list[Daemon] = []

    def start(
        settings: dict[str, Any] | None = None, *, wait_ready: bool = True, **kwargs: Any
    ) -> Daemon:
        config: dict[str, Any] = {"listen": ["127.0.0.1:0"], **mode, "logging": {"level": "debug"}}
        config.update(settings or {})
        path = write_config(tmp_path / f"epolld-{len(started)}.yaml", config)
        daemon = Daemon(path, **kwargs)
        started.append(daemon)
        if wait_ready:
            daemon.wait_for("listening")
        return daemon

    yield start
    for daemon in started:
        daemon.stop()
        assert not daemon.bad_lines, f"log lines that are not JSON: {daemon.bad_lines[:5]}"
