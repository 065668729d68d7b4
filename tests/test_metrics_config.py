"""metrics.listen in the configuration: forms, errors with their line, render, changes."""

from __future__ import annotations

import dataclasses
import pathlib
import subprocess
import sys

import pytest

from epolld.config import (
    Config,
    ListenAddress,
    MetricsConfig,
    changes,
    describe,
    load_config,
    render_config,
)
from tests.test_config import SHIPPED, error_of, load_text, write


def test_off_by_default_and_in_the_shipped_file() -> None:
    """No endpoint unless asked for; etc/epolld.yaml shows it off with an example."""
    assert Config().metrics.listen is None
    assert load_config(str(SHIPPED)).metrics.listen is None
    text = SHIPPED.read_text(encoding="utf-8")
    assert '#   listen: "127.0.0.1:9707"' in text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('metrics: {listen: "127.0.0.1:9707"}', ListenAddress("ipv4", "127.0.0.1", 9707)),
        ('metrics: {listen: "[::1]:9707"}', ListenAddress("ipv6", "::1", 9707)),
        ('metrics: {listen: "unix:/run/m.sock"}', ListenAddress("unix", path="/run/m.sock")),
        (
            'metrics: {listen: {path: /run/epolld/m.sock, mode: "0660"}}',
            ListenAddress("unix", path="/run/epolld/m.sock", mode=0o660),
        ),
        ("metrics: {listen: null}", None),
        ("metrics: {listen: }", None),
        ("metrics:", None),
        (
            'listen: ["127.0.0.1:0"]\nmetrics: {listen: "127.0.0.1:0"}',
            ListenAddress("ipv4", "127.0.0.1", 0),
        ),
    ],
)  # fmt: skip
def test_forms(tmp_path: pathlib.Path, text: str, expected: ListenAddress | None) -> None:
    """Any form of a listen entry, or null; port 0 beside an echo port 0 is fine."""
    assert load_text(tmp_path, text + "\n").metrics.listen == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "metrics:\n  listen: 9707\n",
            ':2: metrics.listen: expected an address such as "127.0.0.1:9707", or null, got 9707',
            id="number",
        ),
        pytest.param(
            'metrics:\n  listen: ["127.0.0.1:9707"]\n',
            ':2: metrics.listen: expected an address such as "127.0.0.1:9707", or null, got a list',
            id="list",
        ),
        pytest.param(
            "metrics:\n  listen: localhost:9707\n",
            ":2: metrics.listen: expected an IP address (host names are not resolved) such as"
            " 127.0.0.1:7080 or [::1]:7080, got 'localhost:9707'",
            id="host-name",
        ),
        pytest.param(
            "metrics:\n  listen: unix:relative\n",
            ":2: metrics.listen: unix socket path must be absolute, got 'relative'",
            id="relative-unix",
        ),
        pytest.param(
            "metrics:\n  listn: x\n",
            ":2: unknown option 'listn' in metrics (did you mean 'listen'?)",
            id="typo",
        ),
        pytest.param(
            "metrics: on\n",
            ":1: metrics: expected a mapping of options, got a boolean (on)",
            id="boolean-section",
        ),
        pytest.param(
            'metrics:\n  listen: "127.0.0.1:7080"\n',
            ":2: metrics.listen: '127.0.0.1:7080' and '127.0.0.1:7080' (the default listen)"
            " cannot both be bound: the metrics endpoint needs a socket of its own",
            id="default-echo-address",
        ),
        pytest.param(
            'listen:\n  - "127.0.0.1:7080"\n  - "0.0.0.0:9707"\nmetrics:\n'
            '  listen: "127.0.0.1:9707"\n',
            ":5: metrics.listen: '127.0.0.1:9707' and '0.0.0.0:9707' (listen[1], line 3)"
            " cannot both be bound: the metrics endpoint needs a socket of its own",
            id="under-a-wildcard",
        ),
        pytest.param(
            'listen: ["unix:/run/e.sock"]\nmetrics: {listen: "unix:/run/e.sock"}\n',
            ":2: metrics.listen: 'unix:/run/e.sock' and 'unix:/run/e.sock' (listen[0], line 1)"
            " cannot both be bound: the metrics endpoint needs a socket of its own",
            id="same-unix-path",
        ),
    ],
)
def test_errors_name_file_line_and_key(tmp_path: pathlib.Path, text: str, expected: str) -> None:
    """Each mistake in metrics: fails with file, line, key and what was wrong."""
    assert error_of(write(tmp_path, text)) == expected


def test_wildcard_metrics_beside_specific_echo_is_refused(tmp_path: pathlib.Path) -> None:
    """A wildcard metrics address takes its port on every address, the echo's too."""
    text = 'listen: ["127.0.0.1:9707"]\nmetrics: {listen: "0.0.0.0:9707"}\n'
    assert "cannot both be bound" in error_of(write(tmp_path, text))


@pytest.mark.parametrize(
    "address",
    [
        ListenAddress("ipv4", "127.0.0.1", 9707),
        ListenAddress("ipv6", "::1", 0),
        ListenAddress("unix", path="/run/m é.sock", mode=0o600),
        None,
    ],
)
def test_render_round_trips(tmp_path: pathlib.Path, address: ListenAddress | None) -> None:
    """--print-config writes metrics.listen so that it loads back the same."""
    config = Config(metrics=MetricsConfig(address))
    path = write(tmp_path, render_config(config))
    assert load_config(path) == dataclasses.replace(config, source=path)


def test_print_config_shows_it(tmp_path: pathlib.Path) -> None:
    """epolld --print-config shows the section, off or on."""
    path = write(tmp_path, 'metrics: {listen: "127.0.0.1:9707"}\n')
    out = subprocess.run(
        [sys.executable, "-m", "epolld", "--print-config", "--config", path],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    assert "metrics:\n  listen: 127.0.0.1:9707\n" in out


def test_check_config_names_the_endpoint() -> None:
    """The --check-config summary names the metrics address when there is one."""
    config = Config(metrics=MetricsConfig(ListenAddress("ipv4", "127.0.0.1", 9707)))
    assert describe(config).endswith("; metrics: 127.0.0.1:9707")
    assert "metrics" not in describe(Config())


def test_changes_name_metrics_listen() -> None:
    """A reload that moves the endpoint reports metrics.listen with both addresses."""
    old = Config()
    new = dataclasses.replace(
        old, metrics=MetricsConfig(ListenAddress("unix", path="/run/m.sock", mode=0o660))
    )
    assert changes(old, new) == {"metrics.listen": (None, "unix:/run/m.sock mode=0660")}
