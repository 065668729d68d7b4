"""Property tests: load_config() fails only with ConfigError, and render_config() round-trips.

Inputs are random text and bytes, random YAML documents over the option names, and the
shipped etc/epolld.yaml mutated (characters deleted and inserted, values swapped, keys
inserted, values replaced by random types). Bounded to a few seconds per test.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import pathlib
import re
from collections.abc import Callable
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from epolld.config import (
    MAX_DURATION_S,
    MAX_UNIX_PATH_BYTES,
    BuffersConfig,
    Config,
    DaemonConfig,
    LimitsConfig,
    ListenAddress,
    LoggingConfig,
    ProxyConfig,
    UdpConfig,
    load_config,
    render_config,
)
from epolld.errors import ConfigError

SHIPPED_TEXT = (pathlib.Path(__file__).resolve().parent.parent / "etc" / "epolld.yaml").read_text(
    encoding="utf-8"
)
FUZZ = settings(
    max_examples=300,
    deadline=None,
    # tmp_path is shared by all examples of a test; each example overwrites the same file.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

SECTIONS = {
    "buffers": ["read_size", "high_water", "low_water"],
    "limits": ["max_connections", "max_connections_per_ip", "idle_timeout"],
    "logging": ["level", "format", "connections"],
    "daemon": ["pidfile", "log_file"],
    "udp": ["rate", "burst", "byte_rate", "total_rate", "sources", "refuse_source_ports",
            "max_datagram"],
    "proxy": ["trusted", "timeout"],
}  # fmt: skip
TOP_LEVEL = ["listen", "backlog", "trigger", "io", "shutdown_timeout", "stats_interval",
             "watchdog", *SECTIONS]  # fmt: skip
KEYS = (
    TOP_LEVEL
    + [k for keys in SECTIONS.values() for k in keys]
    + ["path", "mode", "address", "proxy_protocol", "<<"]
)
# Strings that are almost right for some option, so mutations reach the converters.
NEAR_MISSES = ["64KiB", "1MB", "500ms", "2m", "-1s", "7d", "8d", "0660", "0999", "level", "edge",
               "splice", "[::1]:7080", "127.0.0.1:7080", "unix:/run/e.sock", "unix:rel", "/run/x",
               "yes", "off", "~", "1:30", "0x_", "._", ".nan", "1e999", "!!bool x"]  # fmt: skip
# Characters that carry meaning in YAML, to make mutations hit the parser's corners.
YAML_CHARS = st.sampled_from(list(":-[]{},#&*!|>'\"%@`?~ \n\t\\0123456789abcxyz\x00\x85\ufeff"))

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(NEAR_MISSES)
)
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=6,
)


def dump_value(value: object) -> str:
    """A value as YAML flow text that fits after "key: " on one line."""
    text = yaml.safe_dump(value, default_flow_style=True, width=2**20, allow_unicode=True)
    return text.removesuffix("\n").removesuffix("\n...").replace("\n", " ")


def write(tmp_path: pathlib.Path, data: str | bytes, name: str = "epolld.yaml") -> str:
    path = tmp_path / name
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_bytes(data.encode("utf-8", "surrogatepass"))
    return str(path)


def assert_loads_or_config_error(tmp_path: pathlib.Path, data: str | bytes) -> None:
    """load_config either succeeds, and then round-trips, or raises ConfigError naming the file."""
    path = write(tmp_path, data)
    try:
        config = load_config(path)
    except ConfigError as e:
        message = str(e)
    else:
        again = write(tmp_path, render_config(config), "rendered.yaml")
        assert load_config(again) == dataclasses.replace(config, source=again)
        return
    assert message.startswith(path)


@FUZZ
@given(text=st.text(max_size=200))
def test_random_text(tmp_path: pathlib.Path, text: str) -> None:
    """Any text, lone surrogates included, fails only with ConfigError."""
    assert_loads_or_config_error(tmp_path, text)


@FUZZ
@given(data=st.binary(max_size=200))
def test_random_bytes(tmp_path: pathlib.Path, data: bytes) -> None:
    """Any bytes, most of them not UTF-8, fail only with ConfigError."""
    assert_loads_or_config_error(tmp_path, data)


@FUZZ
@given(
    document=st.dictionaries(
        st.sampled_from(TOP_LEVEL) | st.text(max_size=8),
        values
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), values, max_size=4)
        | st.lists(values | st.sampled_from(NEAR_MISSES), max_size=3),
        max_size=6,
    )
)
def test_random_documents(tmp_path: pathlib.Path, document: dict[str, Any]) -> None:
    """Well-formed YAML with the real option names and random values fails only with ConfigError."""
    assert_loads_or_config_error(tmp_path, yaml.safe_dump(document, allow_unicode=True))


# --- mutations of the shipped file -----------------------------------------------------

Draw = Callable[[st.SearchStrategy[Any]], Any]
OPTION_LINE = re.compile(r"^(\s*(?:- )?[a-z_]+:) ?(.*)$")


def option_lines(lines: list[str]) -> list[int]:
    return [i for i, line in enumerate(lines) if OPTION_LINE.match(line)]


def delete_chars(draw: Draw, text: str) -> str:
    start: int = draw(st.integers(0, len(text)))
    length: int = draw(st.integers(1, 20))
    return text[:start] + text[start + length :]


def insert_chars(draw: Draw, text: str) -> str:
    at: int = draw(st.integers(0, len(text)))
    inserted: str = draw(st.text(YAML_CHARS, min_size=1, max_size=8))
    return text[:at] + inserted + text[at:]


def swap_values(draw: Draw, text: str) -> str:
    lines = text.split("\n")
    candidates = option_lines(lines)
    if len(candidates) < 2:
        return text
    a, b = draw(st.lists(st.sampled_from(candidates), min_size=2, max_size=2, unique=True))
    match_a, match_b = OPTION_LINE.match(lines[a]), OPTION_LINE.match(lines[b])
    assert match_a
    assert match_b
    lines[a] = f"{match_a[1]} {match_b[2]}"
    lines[b] = f"{match_b[1]} {match_a[2]}"
    return "\n".join(lines)


def insert_key(draw: Draw, text: str) -> str:
    lines = text.split("\n")
    at = draw(st.integers(0, len(lines)))
    indent = draw(st.sampled_from(["", "  ", "    ", "  - "]))
    key = draw(st.sampled_from(KEYS) | st.text(YAML_CHARS, min_size=1, max_size=6))
    lines.insert(at, f"{indent}{key}: {dump_value(draw(values))}")
    return "\n".join(lines)


def replace_value(draw: Draw, text: str) -> str:
    lines = text.split("\n")
    candidates = option_lines(lines)
    if not candidates:
        return text
    at = draw(st.sampled_from(candidates))
    match = OPTION_LINE.match(lines[at])
    assert match
    lines[at] = f"{match[1]} {dump_value(draw(values))}"
    return "\n".join(lines)


def duplicate_line(draw: Draw, text: str) -> str:
    lines = text.split("\n")
    lines.insert(draw(st.integers(0, len(lines))), draw(st.sampled_from(lines)))
    return "\n".join(lines)


MUTATIONS = [delete_chars, insert_chars, swap_values, insert_key, replace_value, duplicate_line]


@st.composite
def mutated_shipped(draw: Draw) -> str:
    text = SHIPPED_TEXT
    for mutation in draw(st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=4)):
        text = mutation(draw, text)
    return text


@FUZZ
@given(text=mutated_shipped())
def test_mutated_shipped_file(tmp_path: pathlib.Path, text: str) -> None:
    """The shipped file with random edits fails only with ConfigError (or still loads)."""
    assert_loads_or_config_error(tmp_path, text)


def test_mutations_reach_the_validator(tmp_path: pathlib.Path) -> None:
    """The mutation fuzzer is not vacuous: swapping two values is a schema error, not syntax."""
    lines = SHIPPED_TEXT.split("\n")
    backlog = next(i for i, line in enumerate(lines) if line.startswith("backlog:"))
    trigger = next(i for i, line in enumerate(lines) if line.startswith("trigger:"))
    lines[backlog], lines[trigger] = "backlog: level", "trigger: 511"
    path = write(tmp_path, "\n".join(lines))
    with pytest.raises(
        ConfigError, match=r":\d+: backlog: expected a positive integer, got 'level'"
    ):
        load_config(path)


# --- booleans are not numbers ------------------------------------------------------------

NUMERIC_OPTIONS = [
    "udp:\n  rate: {}",
    "udp:\n  burst: {}",
    "udp:\n  byte_rate: {}",
    "udp:\n  total_rate: {}",
    "udp:\n  sources: {}",
    "udp:\n  max_datagram: {}",
    "udp:\n  refuse_source_ports: [{}]",
    "backlog: {}",
    "shutdown_timeout: {}",
    "stats_interval: {}",
    "buffers:\n  read_size: {}",
    "buffers:\n  high_water: {}",
    "buffers:\n  low_water: {}",
    "limits:\n  max_connections: {}",
    "limits:\n  max_connections_per_ip: {}",
    "limits:\n  idle_timeout: {}",
]
BOOLEAN_SPELLINGS = ["yes", "no", "true", "false", "on", "off", "Yes", "NO", "True", "FALSE",
                     "On", "OFF", "!!bool yes", "!!bool false"]  # fmt: skip


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(option=st.sampled_from(NUMERIC_OPTIONS), spelling=st.sampled_from(BOOLEAN_SPELLINGS))
def test_boolean_never_passes_as_a_number(
    tmp_path: pathlib.Path, option: str, spelling: str
) -> None:
    """Every YAML spelling of a boolean is refused by every numeric option, and said to be one."""
    path = write(tmp_path, option.format(spelling) + "\n")
    with pytest.raises(ConfigError, match=r": expected .*, got a boolean \("):
        load_config(path)


# --- render_config round trip over valid configurations -----------------------------------

durations = st.floats(min_value=0.0, max_value=MAX_DURATION_S, allow_nan=False)
paths = (
    st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\0"), max_size=40)
    .map(lambda t: "/" + t)
)  # fmt: skip
unix_paths = paths.filter(lambda p: len(p.encode()) <= MAX_UNIX_PATH_BYTES)
ports = st.integers(0, 65535)
addresses = st.one_of(
    st.builds(lambda ip, port, pp: ListenAddress("ipv4", host=str(ip), port=port,
                                                 proxy_protocol=pp),
              st.ip_addresses(v=4), ports, st.booleans()),
    st.builds(lambda ip, port, pp: ListenAddress("ipv6", host=str(ip), port=port,
                                                 proxy_protocol=pp),
              st.ip_addresses(v=6), ports, st.booleans()),
    st.builds(lambda path, mode, pp: ListenAddress("unix", path=path, mode=mode,
                                                   proxy_protocol=pp),
              unix_paths, st.none() | st.integers(0, 0o777), st.booleans()),
    st.builds(lambda ip, port: ListenAddress("ipv4", host=str(ip), port=port, transport="udp"),
              st.ip_addresses(v=4), ports),
    st.builds(lambda ip, port: ListenAddress("ipv6", host=str(ip), port=port, transport="udp"),
              st.ip_addresses(v=6), ports),
)  # fmt: skip
rates = st.integers(0, 10_000_000) | st.floats(0.0, 10_000_000.0, allow_nan=False)
networks = st.one_of(st.ip_addresses(v=4).map(lambda a: ipaddress.ip_network(f"{a}/32")),
                     st.ip_addresses(v=6).map(lambda a: ipaddress.ip_network(f"{a}/128")),
                     st.sampled_from([ipaddress.ip_network("10.0.0.0/8"),
                                      ipaddress.ip_network("2001:db8::/32")]))  # fmt: skip


def collide(a: ListenAddress, b: ListenAddress) -> bool:
    """Whether bind(2) of both fails: the same socket, or a wildcard and its port."""
    if a.transport != b.transport:
        return False
    if (a.family, a.host, a.port, a.path) == (b.family, b.host, b.port, b.path):
        return True
    if a.family == "unix" or a.family != b.family or a.port != b.port or a.port == 0:
        return False
    return (
        ipaddress.ip_address(a.host).is_unspecified or ipaddress.ip_address(b.host).is_unspecified
    )


def can_bind_all(listen: list[ListenAddress]) -> bool:
    return not any(collide(a, b) for i, a in enumerate(listen) for b in listen[:i])


@st.composite
def buffers(draw: Draw) -> BuffersConfig:
    high = draw(st.integers(1, 2**30))
    return BuffersConfig(
        read_size_bytes=draw(st.integers(1, 64 * 2**20) | st.sampled_from([1024, 2**20])),
        high_water_bytes=high,
        low_water_bytes=draw(st.integers(0, high - 1)),
    )


valid_configs = st.builds(
    Config,
    listen=st.lists(addresses, min_size=1, max_size=4).filter(can_bind_all).map(tuple),
    backlog=st.integers(1, 65535),
    trigger=st.sampled_from(["level", "edge"]),
    io=st.sampled_from(["copy", "splice"]),
    buffers=buffers(),
    limits=st.builds(LimitsConfig, st.integers(1, 10_000_000), st.integers(0, 10_000_000),
                     durations),
    shutdown_timeout_s=durations,
    logging=st.builds(LoggingConfig,
                      st.sampled_from(["trace", "debug", "info", "warning", "error"]),
                      st.sampled_from(["auto", "json", "console"]), st.booleans()),
    stats_interval_s=durations,
    watchdog=st.booleans(),
    daemon=st.builds(DaemonConfig, st.none() | paths, st.none() | paths),
    udp=st.builds(UdpConfig, rates, st.integers(1, 10_000_000), st.integers(0, 2**30), rates,
                  st.integers(1, 1_000_000),
                  st.lists(st.integers(0, 65535), unique=True, max_size=5).map(tuple),
                  st.integers(1, 65507)),
    proxy=st.builds(ProxyConfig, st.lists(networks, min_size=1, max_size=3).map(tuple),
                    durations.filter(lambda d: d > 0)),
)  # fmt: skip


@FUZZ
@given(config=valid_configs)
def test_render_round_trip(tmp_path: pathlib.Path, config: Config) -> None:
    """render_config() of any valid configuration loads back to an equal Config."""
    path = write(tmp_path, render_config(config))
    assert load_config(path) == dataclasses.replace(config, source=path)
