"""Typed, immutable settings and load_config(); the one place that reads YAML.

Skeleton: the dataclasses are the interface the rest of epolld uses. The loader
here is minimal; the config issue completes validation and error messages.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import yaml

from epolld.errors import ConfigError

Trigger = Literal["level", "edge"]
IoMode = Literal["copy", "splice"]
LogFormat = Literal["auto", "json", "console"]
LogLevel = Literal["trace", "debug", "info", "warning", "error"]


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """One address to listen on: TCP over IPv4 or IPv6, or a Unix stream socket path."""

    family: Literal["ipv4", "ipv6", "unix"]
    host: str = ""  # ipv4/ipv6 only, without brackets
    port: int = 0  # ipv4/ipv6 only; 0 lets the kernel choose
    path: str = ""  # unix only
    mode: int | None = None  # unix only: chmod of the socket file, None keeps the umask's

    def __str__(self) -> str:
        if self.family == "unix":
            return f"unix:{self.path}"
        if self.family == "ipv6":
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class BuffersConfig:
    read_size_bytes: int = 256 * 1024
    high_water_bytes: int = 1024 * 1024
    low_water_bytes: int = 256 * 1024


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_connections: int = 10_000
    max_connections_per_ip: int = 0  # 0: no per-address limit
    idle_timeout_s: float = 300.0  # 0: never time out


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: LogLevel = "info"
    format: LogFormat = "auto"  # auto: console on a terminal, JSON otherwise
    connections: bool = False  # log connection_opened/closed at info instead of debug


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    pidfile: str | None = None
    log_file: str | None = None


DEFAULT_LISTEN = (
    ListenAddress("ipv4", host="127.0.0.1", port=7080),
    ListenAddress("ipv6", host="::1", port=7080),
)


@dataclass(frozen=True, slots=True)
class Config:
    listen: tuple[ListenAddress, ...] = DEFAULT_LISTEN
    backlog: int = 511
    trigger: Trigger = "level"
    io: IoMode = "copy"
    buffers: BuffersConfig = field(default_factory=BuffersConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    shutdown_timeout_s: float = 10.0
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    stats_interval_s: float = 60.0  # 0: no periodic stats line
    watchdog: bool = True
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    source: str = ""  # the file it came from, for messages


def parse_address(text: str) -> ListenAddress:
    """Parse "127.0.0.1:7080", "[::1]:7080" or "unix:/path" into a ListenAddress.

    Raises:
        ValueError: with a message fit for the user.
    """
    if text.startswith("unix:"):
        path = text[5:]
        if not path.startswith("/"):
            raise ValueError(f"unix socket path must be absolute, got {text!r}")
        return ListenAddress("unix", path=path)
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"expected HOST:PORT, [HOST]:PORT or unix:/PATH, got {text!r}")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be 0-65535, got {port}")
    if host.startswith("[") and host.endswith("]"):
        return ListenAddress("ipv6", host=host[1:-1], port=port)
    return ListenAddress("ipv4", host=host, port=port)


def load_config(path: str) -> Config:
    """Read and validate the YAML file at path.

    Raises:
        ConfigError: the file is missing, unreadable or invalid; the message names it.
    """
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: {e}") from None
    listen = DEFAULT_LISTEN
    if "listen" in data:
        try:
            listen = tuple(parse_address(a) for a in data["listen"])
        except ValueError as e:
            raise ConfigError(f"{path}: listen: {e}") from None
    config = Config(listen=listen, source=path)
    if "trigger" in data:
        config = dataclasses.replace(config, trigger=data["trigger"])
    return config
