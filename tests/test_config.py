"""load_config(): every error with its exact message and line; render, describe, changes."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import pathlib
import subprocess
import sys

import pytest
import yaml

from epolld.config import (
    MAX_DURATION_S,
    BuffersConfig,
    Config,
    DaemonConfig,
    LimitsConfig,
    ListenAddress,
    LoggingConfig,
    UdpConfig,
    changes,
    describe,
    load_config,
    parse_address,
    render_config,
)
from epolld.errors import ConfigError

SHIPPED = pathlib.Path(__file__).resolve().parent.parent / "etc" / "epolld.yaml"


def write(tmp_path: pathlib.Path, text: str | bytes, name: str = "epolld.yaml") -> str:
    """Write a config file under tmp_path and return its path."""
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return str(path)


def error_of(path: str) -> str:
    """The message load_config(path) fails with, without the path in front."""
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(path), message
    return message[len(path) :]


def load_text(tmp_path: pathlib.Path, text: str) -> Config:
    return load_config(write(tmp_path, text))


# (YAML text, message after the path). Each case proves one message, with its line.
SCHEMA_ERRORS = [
    pytest.param("backlg: 5\n", ":1: unknown option 'backlg' (did you mean 'backlog'?)", id="typo"),
    pytest.param(
        "# comment\n\nbacklog: 511\ntrigger: level\n\nlimits:\n  idle_timout: 5m\n",
        ":7: unknown option 'idle_timout' in limits (did you mean 'idle_timeout'?)",
        id="typo-in-section-line-7",
    ),
    pytest.param(
        "idle_timeout: 5\n",
        ":1: unknown option 'idle_timeout' (did you mean 'limits.idle_timeout'?)",
        id="option-in-wrong-section",
    ),
    pytest.param(
        "logging:\n  max_connections: 5\n",
        ":2: unknown option 'max_connections' in logging (did you mean 'limits.max_connections'?)",
        id="option-in-other-section",
    ),
    pytest.param("colour: red\n", ":1: unknown option 'colour'", id="unknown-no-suggestion"),
    pytest.param("on: 1\n", ":1: unknown option 'on'", id="boolean-looking-key"),
    pytest.param("? [a]\n: 1\n", ":1: option names must be text, got a list", id="key-not-text"),
    pytest.param(
        "\n" * 8 + "limits:\n  max_connections: many\n",
        ":10: limits.max_connections: expected a positive integer, got 'many'",
        id="not-an-integer",
    ),
    pytest.param(
        "backlog: yes\n",
        ":1: backlog: expected a positive integer, got a boolean (yes)",
        id="yes-is-not-a-number",
    ),
    pytest.param(
        "limits:\n  max_connections: on\n",
        ":2: limits.max_connections: expected a positive integer, got a boolean (on)",
        id="on-is-not-a-number",
    ),
    pytest.param(
        "backlog: true\n",
        ":1: backlog: expected a positive integer, got a boolean (true)",
        id="true-is-not-a-number",
    ),
    pytest.param("backlog: 1.5\n", ":1: backlog: expected a positive integer, got 1.5", id="float"),
    pytest.param(
        "limits:\n  max_connections: 0\n",
        ":2: limits.max_connections: expected a positive integer, got 0",
        id="zero-not-positive",
    ),
    pytest.param(
        "limits:\n  max_connections_per_ip: -1\n",
        ":2: limits.max_connections_per_ip: expected a non-negative integer, got -1",
        id="negative",
    ),
    pytest.param(
        "backlog: 70000\n", ":1: backlog: must be at most 65535, got 70000", id="too-large"
    ),
    pytest.param(
        "backlog:\n",
        ":1: backlog: expected a positive integer, got an empty value",
        id="empty-value",
    ),
    pytest.param(
        "backlog: null\n", ":1: backlog: expected a positive integer, got null", id="null-value"
    ),
    pytest.param(
        "backlog: [1]\n", ":1: backlog: expected a positive integer, got a list", id="list-value"
    ),
    pytest.param(
        "backlog: {a: 1}\n",
        ":1: backlog: expected a positive integer, got a mapping",
        id="mapping-value",
    ),
    pytest.param(
        "backlog: !!timestamp foo\n", ":1: backlog: cannot read 'foo'", id="pyyaml-valueerror-tag"
    ),
    pytest.param("backlog: 0x_\n", ":1: backlog: cannot read '0x_'", id="pyyaml-bad-hex"),
    pytest.param(
        "backlog: !!python/object:os.system x\n",
        ":1: backlog: cannot read 'x': could not determine a constructor for the tag"
        " 'tag:yaml.org,2002:python/object:os.system'",
        id="unsafe-tag",
    ),
    pytest.param(
        "stats_interval: 2001-01-01\n",
        ":1: stats_interval: expected a duration such as 30s, 500ms, 2m or a number of seconds,"
        " got '2001-01-01' (read by YAML as a date)",
        id="date",
    ),
    # listen
    pytest.param(
        "listen:\n  - 127.0.0.1:70000\n",
        ":2: listen[0]: port must be 0-65535, got 70000",
        id="port-range",
    ),
    pytest.param(
        "listen:\n  - 127.0.0.1:7080\n  - ::1:7080\n",
        ":3: listen[1]: IPv6 addresses need brackets, as in [::1]:7080, got '::1:7080'",
        id="ipv6-without-brackets",
    ),
    pytest.param(
        "listen: ['[127.0.0.1]:7080']\n",
        ":1: listen[0]: expected an IPv6 address in brackets, got '[127.0.0.1]:7080'",
        id="ipv4-in-brackets",
    ),
    pytest.param(
        "listen: [localhost:7080]\n",
        ":1: listen[0]: expected an IP address (host names are not resolved) such as"
        " 127.0.0.1:7080 or [::1]:7080, got 'localhost:7080'",
        id="host-name",
    ),
    pytest.param(
        "listen: [127.0.0.1]\n",
        ":1: listen[0]: expected HOST:PORT, [HOST]:PORT or unix:/PATH, got '127.0.0.1'",
        id="no-port",
    ),
    pytest.param(
        "listen: ['unix:run/echo.sock']\n",
        ":1: listen[0]: unix socket path must be absolute, got 'run/echo.sock'",
        id="unix-relative",
    ),
    pytest.param(
        "listen: ['unix:/" + "x" * 107 + "']\n",
        ":1: listen[0]: unix socket path is longer than 107 bytes (unix(7)), got '/"
        + "x" * 55
        + "...",
        id="unix-too-long",
    ),
    pytest.param(
        'listen: ["unix:/run/a\\0b"]\n',
        ":1: listen[0]: a path cannot contain a NUL character, got '/run/a\\x00b'",
        id="unix-nul",
    ),
    pytest.param(
        "listen: []\n",
        ":1: listen: the list is empty; epolld needs at least one address",
        id="listen-empty",
    ),
    pytest.param(
        "listen: 127.0.0.1:7080\n",
        ':1: listen: expected a list of addresses such as ["127.0.0.1:7080"], got'
        " '127.0.0.1:7080'",
        id="listen-not-a-list",
    ),
    pytest.param(
        "listen:\n  - 7080\n",
        ':2: listen[0]: expected an address such as "127.0.0.1:7080", got 7080',
        id="listen-port-only",
    ),
    pytest.param(
        "listen:\n  - '[::1]:7080'\n  - 127.0.0.1:7080\n  - '[0:0::0001]:7080'\n",
        ":4: listen[2]: duplicate address '[::1]:7080' (first listed on line 2)",
        id="listen-duplicate-normalized",
    ),
    pytest.param(
        "listen:\n  - unix:/run/e.sock\n  - {path: /run/e.sock, mode: '0600'}\n",
        ":3: listen[1]: duplicate address 'unix:/run/e.sock' (first listed on line 2)",
        id="listen-duplicate-unix",
    ),
    pytest.param(
        "listen:\n  - 0.0.0.0:7080\n  - '[::1]:7080'\n  - 127.0.0.1:7080\n",
        ":4: listen[2]: '127.0.0.1:7080' and '0.0.0.0:7080' (line 2) cannot both be bound:"
        " a wildcard address takes its port on every address",
        id="listen-under-wildcard",
    ),
    pytest.param(
        "listen:\n  - '[::1]:7080'\n  - '[::]:7080'\n",
        ":3: listen[1]: '[::]:7080' and '[::1]:7080' (line 2) cannot both be bound:"
        " a wildcard address takes its port on every address",
        id="listen-wildcard-over-specific",
    ),
    pytest.param(
        "listen:\n  - {mode: '0660'}\n",
        ":2: listen[0]: a unix socket mapping needs a path",
        id="unix-mapping-no-path",
    ),
    pytest.param(
        "listen:\n  - path: /run/e.sock\n    mod: '0660'\n",
        ":3: unknown option 'mod' in listen[0] (did you mean 'mode'?)",
        id="unix-mapping-typo",
    ),
    pytest.param(
        "listen:\n  - path: /run/e.sock\n    mode: '0999'\n",
        ":3: listen[0].mode: expected an octal mode such as \"0660\", got '0999'",
        id="unix-mode-not-octal",
    ),
    pytest.param(
        "listen:\n  - path: /run/e.sock\n    mode: true\n",
        ':3: listen[0].mode: expected an octal mode such as "0660", got a boolean (true)',
        id="unix-mode-boolean",
    ),
    pytest.param(
        "listen:\n  - path: 5\n",
        ":2: listen[0].path: expected a path, got 5",
        id="unix-path-not-text",
    ),
    # duplicates
    pytest.param(
        "backlog: 1\ntrigger: edge\nbacklog: 2\n",
        ":3: duplicate option 'backlog' (first set on line 1)",
        id="duplicate-top",
    ),
    pytest.param(
        "limits:\n  idle_timeout: 1s\n  max_connections: 5\n  'idle_timeout': 2s\n",
        ":4: duplicate option 'idle_timeout' in limits (first set on line 2)",
        id="duplicate-in-section",
    ),
    pytest.param(
        "limits: {}\nlimits: {}\n",
        ":2: duplicate option 'limits' (first set on line 1)",
        id="duplicate-section",
    ),
    pytest.param(
        "base: &b {backlog: 1}\n<<: *b\n",
        ":2: merge keys (<<) are not supported",
        id="merge-key-top",
    ),
    pytest.param(
        "limits:\n  <<: {max_connections: 5}\n",
        ":2: merge keys (<<) are not supported in limits",
        id="merge-key",
    ),
    # buffers
    pytest.param(
        "buffers:\n  high_water: 64KiB\n  low_water: 64KiB\n",
        ":3: buffers.low_water (64KiB) must be below buffers.high_water (64KiB)",
        id="low-water-equal",
    ),
    pytest.param(
        "buffers:\n  read_size: 4KiB\n  high_water: 128KiB\n",
        ":3: buffers.low_water (256KiB) must be below buffers.high_water (128KiB)",
        id="high-water-below-default-low",
    ),
    pytest.param(
        "buffers:\n  read_size: 1MB\n",
        ":2: buffers.read_size: ambiguous unit 'MB': write MiB (1024-based) or bytes, got '1MB'",
        id="size-ambiguous-unit",
    ),
    pytest.param(
        "buffers:\n  read_size: 0.5B\n",
        ":2: buffers.read_size: must be a whole number of bytes, got '0.5B'",
        id="size-fraction",
    ),
    pytest.param(
        "buffers:\n  read_size: 0\n",
        ":2: buffers.read_size: must be more than 0 bytes, got 0",
        id="size-zero",
    ),
    pytest.param(
        "buffers:\n  read_size: 65MiB\n",
        ":2: buffers.read_size: must be at most 64MiB, got '65MiB'",
        id="size-too-large",
    ),
    pytest.param(
        "buffers:\n  high_water: lots\n",
        ":2: buffers.high_water: expected a size such as 64KiB, 1MiB or a number of bytes,"
        " got 'lots'",
        id="size-words",
    ),
    pytest.param(
        "buffers:\n  high_water: 2 parsecs\n",
        ":2: buffers.high_water: expected a size such as 64KiB, 1MiB or a number of bytes,"
        " got '2 parsecs'",
        id="size-unknown-unit",
    ),
    pytest.param(
        "buffers:\n  low_water: off\n",
        ":2: buffers.low_water: expected a size such as 64KiB, 1MiB or a number of bytes,"
        " got a boolean (off)",
        id="size-boolean",
    ),
    # durations
    pytest.param(
        "shutdown_timeout: -1\n",
        ":1: shutdown_timeout: expected a duration such as 30s, 500ms, 2m or a number of"
        " seconds, got -1",
        id="duration-negative",
    ),
    pytest.param(
        "shutdown_timeout: 5 minutes\n",
        ":1: shutdown_timeout: expected a duration such as 30s, 500ms, 2m or a number of"
        " seconds, got '5 minutes'",
        id="duration-words",
    ),
    pytest.param(
        "shutdown_timeout: .nan\n",
        ":1: shutdown_timeout: expected a duration such as 30s, 500ms, 2m or a number of"
        " seconds, got nan",
        id="duration-nan",
    ),
    pytest.param(
        "stats_interval: .inf\n",
        ":1: stats_interval: expected a duration such as 30s, 500ms, 2m or a number of"
        " seconds, got inf",
        id="duration-inf",
    ),
    pytest.param(
        "limits:\n  idle_timeout: 8d\n",
        ":2: limits.idle_timeout: must be at most 7d, got '8d'",
        id="duration-too-long",
    ),
    pytest.param(
        "limits:\n  idle_timeout: no\n",
        ":2: limits.idle_timeout: expected a duration such as 30s, 500ms, 2m or a number of"
        " seconds, got a boolean (no)",
        id="duration-boolean",
    ),
    # choices, booleans, paths
    pytest.param(
        "trigger: Level\n", ":1: trigger: expected one of level, edge, got 'Level'", id="choice"
    ),
    pytest.param("io: zerocopy\n", ":1: io: expected one of copy, splice, got 'zerocopy'", id="io"),
    pytest.param(
        "logging:\n  level: warn\n",
        ":2: logging.level: expected one of trace, debug, info, warning, error, got 'warn'",
        id="log-level",
    ),
    pytest.param(
        "logging:\n  format: 1\n",
        ":2: logging.format: expected one of auto, json, console, got 1",
        id="log-format-number",
    ),
    pytest.param(
        "watchdog: 'true'\n",
        ":1: watchdog: expected true or false, got 'true'",
        id="quoted-boolean",
    ),
    pytest.param(
        "logging:\n  connections: 1\n",
        ":2: logging.connections: expected true or false, got 1",
        id="number-as-boolean",
    ),
    pytest.param(
        "daemon:\n  pidfile: epolld.pid\n",
        ":2: daemon.pidfile: expected an absolute path (the daemon runs from /), or null,"
        " got 'epolld.pid'",
        id="relative-pidfile",
    ),
    pytest.param(
        'daemon:\n  log_file: "/var/log/a\\0"\n',
        ":2: daemon.log_file: a path cannot contain a NUL character, got '/var/log/a\\x00'",
        id="nul-in-log-file",
    ),
    pytest.param(
        'daemon:\n  log_file: "/var/log/\\ud800"\n',
        ":2: daemon.log_file: a path must be valid Unicode text, got '/var/log/\\ud800'",
        id="surrogate-in-log-file",
    ),
    # udp listen entries and the udp section
    pytest.param(
        "listen: ['udp:7080']\n",
        ":1: listen[0]: expected udp:HOST:PORT or udp:[HOST]:PORT, got 'udp:7080'",
        id="udp-no-host",
    ),
    pytest.param(
        "listen: ['udp:::1:7']\n",
        ":1: listen[0]: IPv6 addresses need brackets, as in udp:[::1]:7080, got 'udp:::1:7'",
        id="udp-ipv6-without-brackets",
    ),
    pytest.param(
        "listen: ['udp:localhost:7']\n",
        ":1: listen[0]: expected an IP address (host names are not resolved) such as"
        " udp:127.0.0.1:7080 or udp:[::1]:7080, got 'udp:localhost:7'",
        id="udp-host-name",
    ),
    pytest.param(
        "listen: ['udp:unix:/run/e.sock']\n",
        ":1: listen[0]: UDP listens on IP addresses only, got 'udp:unix:/run/e.sock'",
        id="udp-unix",
    ),
    pytest.param(
        "listen: ['udp:127.0.0.1:65536']\n",
        ":1: listen[0]: port must be 0-65535, got 65536",
        id="udp-port-range",
    ),
    pytest.param(
        "listen:\n  - udp:127.0.0.1:7\n  - 127.0.0.1:7\n  - udp:127.0.0.1:7\n",
        ":4: listen[2]: duplicate address 'udp:127.0.0.1:7' (first listed on line 2)",
        id="udp-duplicate",
    ),
    pytest.param(
        "listen:\n  - udp:0.0.0.0:7\n  - udp:127.0.0.2:7\n",
        ":3: listen[1]: 'udp:127.0.0.2:7' and 'udp:0.0.0.0:7' (line 2) cannot both be bound:"
        " a wildcard address takes its port on every address",
        id="udp-under-wildcard",
    ),
    pytest.param(
        "udp:\n  rate: -1\n",
        ":2: udp.rate: expected a number per second (0 turns the limit off), got -1",
        id="udp-rate-negative",
    ),
    pytest.param(
        "udp:\n  rate: .inf\n",
        ":2: udp.rate: expected a number per second (0 turns the limit off), got inf",
        id="udp-rate-infinite",
    ),
    pytest.param(
        "udp:\n  total_rate: yes\n",
        ":2: udp.total_rate: expected a number per second (0 turns the limit off),"
        " got a boolean (yes)",
        id="udp-total-rate-boolean",
    ),
    pytest.param(
        "udp:\n  total_rate: 20000000\n",
        ":2: udp.total_rate: must be at most 10000000, got 20000000",
        id="udp-total-rate-too-large",
    ),
    pytest.param(
        "udp:\n  burst: 0\n",
        ":2: udp.burst: expected a positive integer, got 0",
        id="udp-burst-zero",
    ),
    pytest.param(
        "udp:\n  byte_rate: 1MB\n",
        ":2: udp.byte_rate: ambiguous unit 'MB': write MiB (1024-based) or bytes, got '1MB'",
        id="udp-byte-rate-ambiguous",
    ),
    pytest.param(
        "udp:\n  sources: 0\n",
        ":2: udp.sources: expected a positive integer, got 0",
        id="udp-sources-zero",
    ),
    pytest.param(
        "udp:\n  max_datagram: 64KiB\n",
        ":2: udp.max_datagram: must be at most 65507, got '64KiB'",
        id="udp-max-datagram-too-large",
    ),
    pytest.param(
        "udp:\n  max_datagram: 0\n",
        ":2: udp.max_datagram: must be more than 0 bytes, got 0",
        id="udp-max-datagram-zero",
    ),
    pytest.param(
        "udp:\n  refuse_source_ports: 19\n",
        ":2: udp.refuse_source_ports: expected a list of port numbers such as [0, 7, 19], got 19",
        id="udp-ports-not-a-list",
    ),
    pytest.param(
        "udp:\n  refuse_source_ports:\n    - 7\n    - 70000\n",
        ":4: udp.refuse_source_ports[1]: expected a port number 0-65535, got 70000",
        id="udp-port-too-large",
    ),
    pytest.param(
        "udp:\n  refuse_source_ports:\n    - 7\n    - true\n",
        ":4: udp.refuse_source_ports[1]: expected a port number 0-65535, got a boolean (true)",
        id="udp-port-boolean",
    ),
    pytest.param(
        "udp:\n  refuse_source_ports: [7, 19, 7]\n",
        ":2: udp.refuse_source_ports[2]: port 7 is listed twice",
        id="udp-port-twice",
    ),
    pytest.param(
        "udp:\n  rat: 5\n",
        ":2: unknown option 'rat' in udp (did you mean 'rate'?)",
        id="udp-typo",
    ),
    # shapes
    pytest.param(
        "limits: 5\n", ":1: limits: expected a mapping of options, got 5", id="section-scalar"
    ),
    pytest.param(
        "limits:\n  - 5\n",
        ":2: limits: expected a mapping of options, got a list",
        id="section-list",
    ),
    pytest.param(
        "limits: !!set {a, b}\n",
        ":1: limits: expected a mapping of options, got a mapping tagged tag:yaml.org,2002:set",
        id="section-set",
    ),
    pytest.param(
        "- listen\n",
        ":1: the top level must be a mapping of options, got a list",
        id="top-level-list",
    ),
    pytest.param(
        "hello\n",
        ":1: the top level must be a mapping of options, got 'hello'",
        id="top-level-scalar",
    ),
]


@pytest.mark.parametrize(("text", "expected"), SCHEMA_ERRORS)
def test_schema_error_message(tmp_path: pathlib.Path, text: str, expected: str) -> None:
    """Each invalid value, key or shape fails with its exact message and 1-based line."""
    assert error_of(write(tmp_path, text)) == expected


SYNTAX_ERRORS = [
    pytest.param(
        "backlog: 511\nlimits:\n  max_connections: 5\n    idle_timeout: 3\n",
        ":4:17: mapping values are not allowed here, in '    idle_timeout: 3'",
        id="mapping-values",
    ),
    pytest.param(
        "listen:\n  - 127.0.0.1:7080\n  - [::1]:7080\n",
        ":3:6: expected the node content, but found ':' (while parsing a flow node at line 3),"
        " in '  - [::1]:7080' (quote IPv6 addresses: \"[::1]:7080\")",
        id="unquoted-ipv6",
    ),
    pytest.param(
        "trigger: 'level\n",
        ":2:1: found unexpected end of stream (while scanning a quoted scalar at line 1)",
        id="unclosed-quote",
    ),
    pytest.param(
        "backlog: 1\n---\nbacklog: 2\n",
        ":2:1: but found another document (expected a single document in the stream at line 1),"
        " in '---'",
        id="two-documents",
    ),
    pytest.param(
        "backlog: *nothing\n",
        ":1:10: found undefined alias 'nothing', in 'backlog: *nothing'",
        id="undefined-alias",
    ),
    pytest.param(
        "trigger: level\nlisten: [" + "a, " * 40 + "}\n",
        ":2:130: expected the node content, but found '}' (while parsing a flow node at line 2),"
        " in ..." + repr(("listen: [" + "a, " * 40 + "}")[70:]),
        id="long-line-excerpt",
    ),
    pytest.param(
        "backlog: 1\ntrigger: \x01level\n",
        ":2:10: character U+0001 is not allowed in YAML",
        id="control-character",
    ),
    pytest.param(
        "backlog: 1\r\rtrigger: \x01level\n",
        ":3:10: character U+0001 is not allowed in YAML",
        id="control-character-after-cr-line-ends",
    ),
]


@pytest.mark.parametrize(("text", "expected"), SYNTAX_ERRORS)
def test_syntax_error_message(tmp_path: pathlib.Path, text: str, expected: str) -> None:
    """A YAML syntax error names line and column (1-based) and shows the offending line."""
    assert error_of(write(tmp_path, text)) == expected


def test_not_utf8_names_the_byte_and_position(tmp_path: pathlib.Path) -> None:
    """A file that is not UTF-8 is refused with the line and column of the first bad byte."""
    path = write(tmp_path, "backlog: 5\n# caf\xe9\n".encode("latin-1"))
    assert error_of(path) == ":2:6: not UTF-8 text (byte 0xe9); save it as UTF-8"


@pytest.mark.parametrize("depth", [17, 5000])
def test_nesting_too_deep_is_a_config_error(tmp_path: pathlib.Path, depth: int) -> None:
    """Deeply nested lists are refused at level 17, long before Python's recursion limit."""
    path = write(tmp_path, "backlog: " + "[" * depth + "]" * depth + "\n")
    assert error_of(path).startswith(":1:25: nested more than 16 levels deep, in 'backlog: [[[[")


def test_missing_file(tmp_path: pathlib.Path) -> None:
    """A missing file is reported as such."""
    assert error_of(str(tmp_path / "absent.yaml")) == ": no such file"


def test_directory(tmp_path: pathlib.Path) -> None:
    """A directory given as the config file is reported as a directory."""
    assert error_of(str(tmp_path)) == ": is a directory, not a configuration file"


def test_fifo_is_refused_without_blocking(tmp_path: pathlib.Path) -> None:
    """A FIFO is refused before open(), which would block waiting for a writer."""
    path = tmp_path / "fifo"
    os.mkfifo(path)
    assert error_of(str(path)) == ": not a regular file"


def test_too_large(tmp_path: pathlib.Path) -> None:
    """A file over 1 MiB is not taken for a configuration file."""
    path = write(tmp_path, "# " + "x" * (1024 * 1024) + "\n")
    assert error_of(path) == ": larger than 1 MiB, not a configuration file"


def test_nul_in_path() -> None:
    """A path with a NUL byte fails as a ConfigError, not ValueError."""
    with pytest.raises(ConfigError, match=r"^'/etc/a\\x00b': not a valid file name$"):
        load_config("/etc/a\0b")


def test_unreadable_file(tmp_path: pathlib.Path) -> None:
    """A file the daemon's user cannot read gives "permission denied" with that uid."""
    path = write(tmp_path, "backlog: 5\n")
    os.chmod(path, 0o000)
    expected = f"{path}: permission denied (running as uid {os.geteuid()})"
    if os.geteuid() != 0:
        assert error_of(path) == expected[len(path) :]
        return
    # root reads any file: ask a child that lost the two capabilities that allow it.
    # setpriv is util-linux's, which every Debian system has (Essential: yes).
    script = (
        "import sys\nfrom epolld.config import load_config\n"
        "from epolld.errors import ConfigError\n"
        "try:\n    load_config(sys.argv[1])\nexcept ConfigError as e:\n    print(e)\n"
    )
    caps = "-dac_override,-dac_read_search"
    result = subprocess.run(
        ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", "--",
         sys.executable, "-c", script, path],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert result.stdout == expected + "\n"


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "---\n", "~\n", "{}\n"])
def test_empty_file_is_all_defaults(tmp_path: pathlib.Path, text: str) -> None:
    """A file without options is valid and gives every default."""
    path = write(tmp_path, text)
    assert load_config(path) == Config(source=path)


@pytest.mark.parametrize("section", ["buffers", "limits", "logging", "daemon", "udp"])
def test_empty_section_is_defaults(tmp_path: pathlib.Path, section: str) -> None:
    """A section whose options are all commented out keeps its defaults."""
    path = write(tmp_path, f"{section}:\n  # nothing here\n")
    assert load_config(path) == Config(source=path)


# --- values that are accepted --------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30.0), ("500ms", 0.5), ("2m", 120.0), ("1h", 3600.0), ("1d", 86400.0),
     ("1.5s", 1.5), ("5 s", 5.0), ("45", 45.0), ("0", 0.0), ("0.25", 0.25), ("1e-3s", 0.001),
     ("7d", MAX_DURATION_S), ('"90"', 90.0)],
)  # fmt: skip
def test_duration_units(tmp_path: pathlib.Path, text: str, seconds: float) -> None:
    """Durations are read in ms, s, m, h, d or as plain seconds."""
    config = load_text(tmp_path, f"limits:\n  idle_timeout: {text}\n")
    assert config.limits.idle_timeout_s == seconds
    assert type(config.limits.idle_timeout_s) is float


@pytest.mark.parametrize(
    ("text", "size"),
    [("64KiB", 64 * 1024), ("1MiB", 1024 * 1024), ("1GiB", 1024**3), ("1.5KiB", 1536),
     ("100", 100), ("100B", 100), ("2 mib", 2 * 1024 * 1024), ('"4096"', 4096)],
)  # fmt: skip
def test_size_units(tmp_path: pathlib.Path, text: str, size: int) -> None:
    """Sizes are read in B, KiB, MiB, GiB (any case) or as plain bytes."""
    config = load_text(tmp_path, f"buffers:\n  high_water: {text}\n  low_water: 0\n")
    assert config.buffers.high_water_bytes == size


@pytest.mark.parametrize("mode", ["0660", "'0660'", '"0660"', "660"])
def test_unix_mode_is_octal_as_written(tmp_path: pathlib.Path, mode: str) -> None:
    """A Unix socket mode reads like chmod's, quoted or not, with or without the 0."""
    config = load_text(tmp_path, f"listen:\n  - path: /run/epolld/echo.sock\n    mode: {mode}\n")
    assert config.listen == (ListenAddress("unix", path="/run/epolld/echo.sock", mode=0o660),)


def test_listen_forms(tmp_path: pathlib.Path) -> None:
    """IPv4, bracketed IPv6 (normalized), unix: strings and the unix mapping all parse."""
    config = load_text(
        tmp_path,
        "listen:\n  - 0.0.0.0:0\n  - '[::]:65535'\n  - '[fe80::1%lo]:7'\n"
        "  - '[0::0:1]:7080'\n  - unix:/run/a.sock\n  - {path: /run/b.sock}\n",
    )
    assert config.listen == (
        ListenAddress("ipv4", host="0.0.0.0", port=0),
        ListenAddress("ipv6", host="::", port=65535),
        ListenAddress("ipv6", host="fe80::1%lo", port=7),
        ListenAddress("ipv6", host="::1", port=7080),
        ListenAddress("unix", path="/run/a.sock"),
        ListenAddress("unix", path="/run/b.sock"),
    )


def test_listen_wildcards_that_can_coexist(tmp_path: pathlib.Path) -> None:
    """IPv4 and IPv6 wildcards share a port (IPV6_V6ONLY), and port 0 never collides."""
    config = load_text(
        tmp_path,
        "listen: [0.0.0.0:7080, '[::]:7080', 0.0.0.0:0, 127.0.0.1:0, 127.0.0.1:7081,"
        " 127.0.0.2:7081]\n",
    )
    assert len(config.listen) == 6


def test_udp_listen_forms(tmp_path: pathlib.Path) -> None:
    """udp: entries parse for IPv4 and IPv6, and may share a port number with TCP entries."""
    config = load_text(
        tmp_path,
        "listen:\n  - 127.0.0.1:7\n  - udp:127.0.0.1:7\n  - '[::]:7'\n  - 'udp:[::]:7'\n"
        "  - udp:0.0.0.0:8\n",
    )
    assert config.listen == (
        ListenAddress("ipv4", host="127.0.0.1", port=7),
        ListenAddress("ipv4", host="127.0.0.1", port=7, transport="udp"),
        ListenAddress("ipv6", host="::", port=7),
        ListenAddress("ipv6", host="::", port=7, transport="udp"),
        ListenAddress("ipv4", host="0.0.0.0", port=8, transport="udp"),
    )
    assert [str(a) for a in config.listen] == [
        "127.0.0.1:7", "udp:127.0.0.1:7", "[::]:7", "udp:[::]:7", "udp:0.0.0.0:8",
    ]  # fmt: skip
    assert [a.is_udp for a in config.listen] == [False, True, False, True, True]


def test_udp_defaults_are_the_issue_s() -> None:
    """UDP is off by default, and its limits default to safe values with loop guards."""
    config = Config()
    assert not any(a.is_udp for a in config.listen)
    assert config.udp == UdpConfig(
        rate=100,
        burst=200,
        byte_rate_bytes=1024 * 1024,
        total_rate=10_000,
        sources=8192,
        refuse_source_ports=(0, 7, 13, 17, 19, 37, 53, 111, 123, 161, 389, 1900, 11211),
        max_datagram_bytes=65507,
    )


def test_udp_zero_rates_and_fractions(tmp_path: pathlib.Path) -> None:
    """0 turns a rate off, a fractional rate is kept, and an empty port list refuses none."""
    config = load_text(
        tmp_path,
        "udp:\n  rate: 0.5\n  byte_rate: 0\n  total_rate: 0\n  refuse_source_ports: []\n",
    )
    assert config.udp == UdpConfig(
        rate=0.5, byte_rate_bytes=0, total_rate=0, refuse_source_ports=()
    )


def test_every_option_set(tmp_path: pathlib.Path) -> None:
    """A file setting every option yields exactly those values."""
    path = write(
        tmp_path,
        """
listen: ["10.0.0.1:7", "[2001:db8::1]:8"]
backlog: 64
trigger: edge
io: splice
buffers: {read_size: 16KiB, high_water: 2MiB, low_water: 1MiB}
limits: {max_connections: 100, max_connections_per_ip: 4, idle_timeout: 0}
shutdown_timeout: 2m
logging: {level: trace, format: json, connections: yes}
stats_interval: 0
watchdog: false
daemon: {pidfile: /run/epolld.pid, log_file: /var/log/epolld.log}
udp: {rate: 5, burst: 7, byte_rate: 64KiB, total_rate: 1000, sources: 10,
      refuse_source_ports: [19, 7], max_datagram: 1472}
""",
    )
    assert load_config(path) == Config(
        listen=(
            ListenAddress("ipv4", host="10.0.0.1", port=7),
            ListenAddress("ipv6", host="2001:db8::1", port=8),
        ),
        backlog=64,
        trigger="edge",
        io="splice",
        buffers=BuffersConfig(16 * 1024, 2 * 1024 * 1024, 1024 * 1024),
        limits=LimitsConfig(100, 4, 0.0),
        shutdown_timeout_s=120.0,
        logging=LoggingConfig("trace", "json", True),
        stats_interval_s=0.0,
        watchdog=False,
        daemon=DaemonConfig("/run/epolld.pid", "/var/log/epolld.log"),
        udp=UdpConfig(5, 7, 64 * 1024, 1000, 10, (19, 7), 1472),
        source=path,
    )


def test_parse_address_raises_valueerror() -> None:
    """parse_address() keeps its contract: a ValueError with the user's text in it."""
    assert parse_address("127.0.0.1:7080") == ListenAddress("ipv4", host="127.0.0.1", port=7080)
    with pytest.raises(ValueError, match="got 'nope'"):
        parse_address("nope")


# --- the shipped file ---------------------------------------------------------------


def test_shipped_config_is_the_defaults() -> None:
    """etc/epolld.yaml loads, and every value in it equals the built-in default."""
    assert load_config(str(SHIPPED)) == Config(source=str(SHIPPED))


def test_shipped_config_binds_loopback_only() -> None:
    """The package starts the service at install time, so it listens on loopback only."""
    listen = load_config(str(SHIPPED)).listen
    assert {str(a) for a in listen} == {"127.0.0.1:7080", "[::1]:7080"}
    assert all(ipaddress.ip_address(a.host).is_loopback for a in listen)


def test_shipped_config_lists_every_option_with_a_comment() -> None:
    """Every option of the schema appears in etc/epolld.yaml, each under a comment line."""
    text = SHIPPED.read_text(encoding="utf-8")
    shipped = yaml.safe_load(text)
    rendered = yaml.safe_load(render_config(Config()))
    assert shipped.keys() == rendered.keys()
    for key, value in rendered.items():
        if isinstance(value, dict):
            assert shipped[key].keys() == value.keys(), key
    lines = text.splitlines()
    for number, line in enumerate(lines):
        stripped = line.strip()
        if stripped and not stripped.startswith(("#", "-")) and not stripped.endswith(":"):
            assert lines[number - 1].strip().startswith("#"), f"no comment above {line!r}"


def test_shipped_config_explains_exposure() -> None:
    """The comments say how to expose the service and why it is not exposed by default."""
    text = SHIPPED.read_text(encoding="utf-8")
    for needed in ("0.0.0.0:7080", "[::]:7080", "firewall", "amplification", "CVE-1999-0103"):
        assert needed in text


def test_shipped_config_shows_udp_off_with_an_example_and_the_reasons() -> None:
    """UDP stays off in the shipped file; a commented example says how and why it is off."""
    text = SHIPPED.read_text(encoding="utf-8")
    assert not any(a.is_udp for a in load_config(str(SHIPPED)).listen)
    assert '#   - "udp:127.0.0.1:7080"' in text
    for needed in ("spoofed sources", "CVE-1999-0103", "chargen", "reflection"):
        assert needed in text


# --- render_config, describe, changes ------------------------------------------------


def test_render_round_trips_defaults(tmp_path: pathlib.Path) -> None:
    """--print-config output of the defaults loads back to the same settings."""
    path = write(tmp_path, render_config(Config(source="/etc/epolld.yaml")))
    assert load_config(path) == Config(source=path)


def test_render_round_trips_unusual_values(tmp_path: pathlib.Path) -> None:
    """Odd but valid values (fractions of seconds, unix modes, odd sizes) survive a round trip."""
    config = Config(
        listen=(
            ListenAddress("unix", path="/run/é sock: #1", mode=0o600),
            ListenAddress("unix", path="/run/plain.sock"),
            ListenAddress("ipv6", host="fe80::1%lo", port=0),
        ),
        buffers=BuffersConfig(1, 1025, 0),
        limits=LimitsConfig(1, 0, 0.1),
        shutdown_timeout_s=1e-05,
        stats_interval_s=MAX_DURATION_S,
        daemon=DaemonConfig("/run/x\ny.pid", None),
        udp=UdpConfig(0.001, 1, 1, 0, 1, (), 1),
    )
    path = write(tmp_path, render_config(config))
    assert load_config(path) == dataclasses.replace(config, source=path)


def test_render_writes_units() -> None:
    """--print-config shows durations and sizes with their units."""
    text = render_config(Config())
    assert "idle_timeout: 300s\n" in text
    assert "read_size: 256KiB\n" in text
    assert "high_water: 1MiB\n" in text


def test_describe() -> None:
    """The --check-config summary names the listeners, the trigger and the I/O mode."""
    assert describe(Config()) == "listeners: 127.0.0.1:7080 [::1]:7080; trigger: level; io: copy"


def test_changes_empty_when_equal() -> None:
    """Equal configurations (even from different files) have no changes."""
    assert changes(Config(source="/a"), Config(source="/b")) == {}


def test_changes_lists_each_changed_option() -> None:
    """changes() names each changed option by its dotted YAML name with old and new values."""
    old = Config()
    new = dataclasses.replace(
        old,
        listen=(ListenAddress("ipv4", host="127.0.0.1", port=7081),
                ListenAddress("unix", path="/run/e.sock", mode=0o660)),
        limits=dataclasses.replace(old.limits, idle_timeout_s=60.0),
        logging=dataclasses.replace(old.logging, level="debug"),
        watchdog=False,
        udp=dataclasses.replace(old.udp, rate=5, refuse_source_ports=(19,)),
    )  # fmt: skip
    assert changes(old, new) == {
        "listen": (
            ["127.0.0.1:7080", "[::1]:7080"],
            ["127.0.0.1:7081", "unix:/run/e.sock mode=0660"],
        ),
        "limits.idle_timeout": (300.0, 60.0),
        "logging.level": ("info", "debug"),
        "watchdog": (True, False),
        "udp.rate": (100, 5),
        "udp.refuse_source_ports": ((0, 7, 13, 17, 19, 37, 53, 111, 123, 161, 389, 1900, 11211),
                                    (19,)),
    }  # fmt: skip
