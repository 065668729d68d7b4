"""Typed, immutable settings, and the one place that reads the YAML configuration.

load_config() composes the file into YAML nodes instead of plain dicts, so that every
message names the line of the key or value at fault, and walks them against _SCHEMA:
the one table of options, their converters and how render_config() writes them back.

Decisions an operator can rely on (etc/epolld.yaml repeats them as comments):
- An empty file (or one with only comments) is valid: every option has a default.
- Unknown options, duplicate options and YAML merge keys (<<) are errors.
- A boolean is never a number (YAML 1.1 reads yes/no/on/off as booleans), and a
  quoted "true" is not a boolean.
- Durations: 30s, 500ms, 2m, 1h, 1d or a plain number of seconds; at most 7d.
- Sizes: 64KiB, 1MiB, 1GiB or a plain number of bytes. KB/MB/GB are refused as
  ambiguous (1000 or 1024?) rather than guessed.
- listen: a non-empty list of "IPV4:PORT", "[IPV6]:PORT" or "unix:/abs/path", or a
  mapping {path: /abs/path, mode: "0660"} for a Unix socket with a chmod mode (read as
  octal as written, like chmod: 0660, "0660" and 660 are the same); "udp:IPV4:PORT" and
  "udp:[IPV6]:PORT" for UDP echo (a UDP and a TCP listener may share a port number).
  Hosts are IP literals: names are not resolved, so what is bound never depends on DNS.
  Entries that cannot all be bound (the same socket twice; a wildcard such as
  0.0.0.0:7080 with 127.0.0.1:7080) are refused.
- A listen mapping may instead name {address: "0.0.0.0:7080"} (any address form), and
  a TCP or unix: one may say proxy_protocol: true: its clients must start with a PROXY
  header (proxy.py), sent by a proxy from proxy.trusted within proxy.timeout.
- udp: rates of 0 turn that limit off; max_datagram is at most 65507, the largest UDP
  payload over IPv4.
- Nesting deeper than 16 levels is refused (PyYAML is slow on deep nesting).
- pidfile and log_file are absolute paths (the daemon runs from /) or null.
- metrics.listen is null (no metrics endpoint) or one address in the forms of listen; it
  cannot share a socket or port with an echo address.
- agent.listen is null (no agent check) or one TCP address; control.socket is "auto"
  (systemd's runtime directory, else none), an absolute path, or null.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from epolld.errors import ConfigError

Trigger = Literal["level", "edge"]
IoMode = Literal["copy", "splice"]
LogFormat = Literal["auto", "json", "console"]
LogLevel = Literal["trace", "debug", "info", "warning", "error"]

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

MAX_FILE_BYTES = 1 * MiB  # a larger "config" is a mistake (--config /dev/zero, a log file)
# epoll_wait(2) takes an int of milliseconds (24.8 days at most); a week is plenty
# for any timeout or interval and keeps the loop's arithmetic far from that limit.
MAX_DURATION_S = 7 * 86400.0
MAX_NESTING = 16  # lists and mappings inside each other; the schema needs 4
MAX_UNIX_PATH_BYTES = 107  # sun_path is 108 bytes including the final NUL (unix(7))
MAX_UDP_PAYLOAD_BYTES = 65507  # 65535 - 8 (UDP header) - 20 (IPv4 header)
MAX_RATE = 10_000_000  # datagrams per second; more is a typo, not a plan


@dataclass(frozen=True, slots=True)
class Faults:
    """A listener's injected faults (epolld/faults/), each off at its default.

    TCP: delay_s + uniform(0, jitter_s) per chunk read, bandwidth_bytes_per_s (bursts of
    at most 64 KiB), and a FIN (close_*) or an RST (reset_*) after so many bytes echoed or
    so long after accept. UDP: drop (a fraction of datagrams) and delay_s/jitter_s.
    """

    delay_s: float = 0.0
    jitter_s: float = 0.0
    bandwidth_bytes_per_s: int = 0
    close_after_bytes: int | None = None
    close_after_s: float | None = None
    reset_after_bytes: int | None = None
    reset_after_s: float | None = None
    drop: float = 0.0

    def active(self) -> dict[str, object]:
        """The faults that are on, by their YAML key (the log line, --print-config)."""
        return {
            key: write(getattr(self, attr))
            for key, attr, _, write, _ in _FAULT_KEYS
            if getattr(self, attr) != getattr(NO_FAULTS, attr)
        }


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """One address to listen on: TCP or UDP over IPv4 or IPv6, or a Unix stream socket path."""

    family: Literal["ipv4", "ipv6", "unix"]
    host: str = ""  # ipv4/ipv6 only, without brackets
    port: int = 0  # ipv4/ipv6 only; 0 lets the kernel choose
    path: str = ""  # unix only
    mode: int | None = None  # unix only: chmod of the socket file, None keeps the umask's
    transport: Literal["tcp", "udp"] = "tcp"  # udp: ipv4/ipv6 only
    proxy_protocol: bool = False  # clients must send a PROXY header first (proxy.py)
    # TLS (tls/): on, and this listener's own files over the tls: section's (None: the
    # section's). Flat strings, not a nested dataclass: the address stays hashable and
    # travels in handoff records as asdict() writes it.
    tls: bool = False
    tls_certificate: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    tls_min_version: str | None = None
    # What the listener serves (services/): echo (RFC 862), discard (RFC 863), chargen
    # (RFC 864, TCP only) or info (what the server saw, as JSON). Not part of the socket:
    # a reload may change it, and new connections get the new one.
    service: Literal["echo", "discard", "chargen", "info"] = "echo"
    # faults: (fault injection, epolld/faults/): None, or what this listener does wrong.
    # Not part of the socket (listening.sockets.socket_of() drops it): a reload that changes
    # it keeps the socket.
    faults: Faults | None = None

    def __post_init__(self) -> None:
        if isinstance(self.faults, dict):  # a handoff record, written by asdict()
            object.__setattr__(self, "faults", Faults(**self.faults))

    def __str__(self) -> str:
        if self.family == "unix":
            return f"unix:{self.path}"
        prefix = "udp:" if self.transport == "udp" else ""
        if self.family == "ipv6":
            return f"{prefix}[{self.host}]:{self.port}"
        return f"{prefix}{self.host}:{self.port}"

    @property
    def is_udp(self) -> bool:
        return self.transport == "udp"


@dataclass(frozen=True, slots=True)
class BuffersConfig:
    """Per-connection buffering: recv() size and the backpressure water marks."""

    read_size_bytes: int = 256 * KiB  # bytes asked of each recv()
    high_water_bytes: int = 1 * MiB  # unsent bytes at which a peer's reading pauses
    low_water_bytes: int = 256 * KiB  # unsent bytes at which it resumes; below high water


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """Connection limits and the idle timeout."""

    max_connections: int = 10_000
    max_connections_per_ip: int = 0  # 0: no per-address limit
    idle_timeout_s: float = 300.0  # 0: never time out


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    """What is logged and how it is rendered."""

    level: LogLevel = "info"
    format: LogFormat = "auto"  # auto: journal entries under systemd, a TTY console, else JSON
    connections: bool = False  # log connection_opened/closed at info instead of debug


IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
DEFAULT_TRUSTED: tuple[IpNetwork, ...] = (
    ipaddress.IPv4Network("127.0.0.0/8"),
    ipaddress.IPv6Network("::1/128"),
)


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """Who may send a PROXY header on a proxy_protocol listener, and how long it may take."""

    trusted: tuple[IpNetwork, ...] = DEFAULT_TRUSTED  # source networks of the proxies
    timeout_s: float = 5.0  # the whole header must arrive within it


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """Files for classic daemon mode (epolld --daemon); unused under systemd."""

    pidfile: str | None = None
    log_file: str | None = None


# Source ports whose services answer any datagram: a reply to them could start a loop
# between two such services (CVE-1999-0103, echo <-> chargen) or reflect a spoofed request
# at them. FreeBSD inetd's check_loop() refuses the same small services; 0 is never a real
# source port. 7 echo, 13 daytime, 17 qotd, 19 chargen, 37 time, 53 DNS, 111 portmapper,
# 123 NTP, 161 SNMP, 389 CLDAP, 1900 SSDP, 11211 memcached.
DEFAULT_REFUSED_SOURCE_PORTS = (0, 7, 13, 17, 19, 37, 53, 111, 123, 161, 389, 1900, 11211)


@dataclass(frozen=True, slots=True)
class UdpConfig:
    """UDP echo limits: token buckets per source address and in total, and loop guards."""

    rate: float = 100  # datagrams per second answered per source address; 0: no limit
    burst: int = 200  # the per-source bucket: datagrams answered at once after a pause
    byte_rate_bytes: int = 1 * MiB  # bytes per second answered per source; 0: no limit
    total_rate: float = 10_000  # datagrams per second answered over all sources; 0: no limit
    sources: int = 8192  # source addresses tracked at once (least recently seen forgotten)
    refuse_source_ports: tuple[int, ...] = DEFAULT_REFUSED_SOURCE_PORTS
    max_datagram_bytes: int = MAX_UDP_PAYLOAD_BYTES  # longer datagrams are dropped, not cut


TlsVersion = Literal["1.2", "1.3"]


@dataclass(frozen=True, slots=True)
class SniEntry:
    """A certificate chosen by the client's server name (SNI)."""

    names: tuple[str, ...]  # "a.example", or "*.b.example" for one label under b.example
    certificate: str
    key: str


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """The certificates of `tls: true` listeners (tls/); a listener may override the files."""

    certificate: str | None = None  # PEM: the leaf, then its chain
    key: str | None = None  # PEM
    client_ca: str | None = None  # PEM bundle; set: every client needs a certificate it signed
    min_version: TlsVersion = "1.2"
    handshake_timeout_s: float = 10.0  # from accept, or from the end of a PROXY header
    sni: tuple[SniEntry, ...] = ()


@dataclass(frozen=True)
class ListenerTls:
    """What one TLS listener serves: its files over the section's (see tls_of())."""

    certificate: str
    key: str
    client_ca: str | None
    min_version: TlsVersion
    sni: tuple[SniEntry, ...]


def tls_of(config: Config, address: ListenAddress) -> ListenerTls | None:
    """The TLS settings of a listener, or None if it is not TLS."""
    if not address.tls:
        return None
    section = config.tls
    certificate = address.tls_certificate or section.certificate
    key = address.tls_key or section.key
    assert certificate is not None
    assert key is not None
    version = address.tls_min_version or section.min_version
    return ListenerTls(
        certificate=certificate,
        key=key,
        client_ca=address.tls_client_ca or section.client_ca,
        min_version="1.3" if version == "1.3" else "1.2",
        sni=section.sni,
    )


def tls_certificate_files(config: Config) -> list[str]:
    """Every certificate file the TLS listeners of config serve (none without one)."""
    files: set[str] = set()
    for address in config.listen:
        settings = tls_of(config, address)
        if settings is not None:
            files.add(settings.certificate)
            files.update(entry.certificate for entry in settings.sni)
    return sorted(files)


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """The Prometheus endpoint (HTTP on the daemon's own loop); off while listen is None."""

    listen: ListenAddress | None = None


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """HAProxy's agent check (observability/agent.py); off while listen is None."""

    listen: ListenAddress | None = None


CONTROL_AUTO = "auto"  # $RUNTIME_DIRECTORY/control.sock under systemd, else no socket


@dataclass(frozen=True, slots=True)
class ControlConfig:
    """The operator's control socket (control.py): a path, "auto", or None (none)."""

    socket: str | None = CONTROL_AUTO


DEFAULT_LISTEN = (
    ListenAddress("ipv4", host="127.0.0.1", port=7080),
    ListenAddress("ipv6", host="::1", port=7080),
)


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration; load_config() builds it, render_config() writes it."""

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
    udp: UdpConfig = field(default_factory=UdpConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    workers: int | Literal["auto"] = 1  # worker processes; see worker_count()
    source: str = ""  # the file it came from, for messages


# --- addresses -----------------------------------------------------------------------

_PORT = re.compile(r"[0-9]{1,10}")  # more digits are no port; int() of them is slow


def parse_address(text: str) -> ListenAddress:
    """Parse "127.0.0.1:7080", "[::1]:7080", "unix:/path" or "udp:..." into a ListenAddress.

    Hosts must be IP literals; they are normalized ("[::0001]" becomes "[::1]").

    Raises:
        ValueError: with a message fit for the user.
    """
    if text.startswith("unix:"):
        return ListenAddress("unix", path=_check_unix_path(text[5:]))
    if text.startswith("udp:"):
        if text.startswith("udp:unix:"):
            raise ValueError(f"UDP listens on IP addresses only, got {_show(text)}")
        address = _parse_ip_address(text[4:], text, "udp:")
        return dataclasses.replace(address, transport="udp")
    return _parse_ip_address(text, text, "")


def _parse_ip_address(text: str, written: str, prefix: str) -> ListenAddress:
    """Parse "HOST:PORT" or "[HOST]:PORT"; messages quote written and use prefix in examples."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not _PORT.fullmatch(port_text):
        expected = (
            f"{prefix}HOST:PORT or {prefix}[HOST]:PORT"
            if prefix
            else "HOST:PORT, [HOST]:PORT or unix:/PATH"
        )
        raise ValueError(f"expected {expected}, got {_show(written)}")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"port must be 0-65535, got {port}")
    if host.startswith("[") and host.endswith("]"):
        try:
            return ListenAddress("ipv6", host=str(ipaddress.IPv6Address(host[1:-1])), port=port)
        except ValueError:
            raise ValueError(
                f"expected an IPv6 address in brackets, got {_show(written)}"
            ) from None
    try:
        return ListenAddress("ipv4", host=str(ipaddress.IPv4Address(host)), port=port)
    except ValueError:
        pass
    if ":" in host:
        raise ValueError(
            f"IPv6 addresses need brackets, as in {prefix}[::1]:7080, got {_show(written)}"
        )
    raise ValueError(
        f"expected an IP address (host names are not resolved) such as {prefix}127.0.0.1:7080"
        f" or {prefix}[::1]:7080, got {_show(written)}"
    )


def _check_unix_path(path: str) -> str:
    """Return path if it can be a Unix socket's path; raise ValueError saying why not."""
    if not path.startswith("/"):
        raise ValueError(f"unix socket path must be absolute, got {_show(path)}")
    if problem := _text_problem(path):
        raise ValueError(f"{problem}, got {_show(path)}")
    if len(path.encode()) > MAX_UNIX_PATH_BYTES:
        raise ValueError(
            f"unix socket path is longer than {MAX_UNIX_PATH_BYTES} bytes (unix(7)),"
            f" got {_show(path)}"
        )
    return path


def _text_problem(text: str) -> str | None:
    """What no file name can hold: NUL, and lone surrogates from YAML escapes such as \\ud800."""
    if "\0" in text:
        return "a path cannot contain a NUL character"
    try:
        text.encode()
    except UnicodeEncodeError:
        return "a path must be valid Unicode text"
    return None


def _address_text(address: ListenAddress) -> str:
    """The address as changes() reports it: str(address), plus its mode and PROXY flag."""
    text = str(address)
    if address.mode is not None:
        text += f" mode={address.mode:04o}"
    if address.proxy_protocol:
        text += " proxy_protocol"
    if address.tls:
        text += " tls"
        for name in ("certificate", "key", "client_ca", "min_version"):
            value = getattr(address, f"tls_{name}")
            if value is not None:
                text += f" {name}={value}"
    if address.service != "echo":
        text += f" service={address.service}"
    if address.faults is not None:
        text += "".join(f" {k}={v}" for k, v in address.faults.active().items())
    return text


# --- converters: a YAML value to a field value, or _Invalid ------------------------------


class _Invalid(Exception):
    """A value outside an option's domain; the message says what was expected."""


Convert = Callable[[object], Any]


def _integer(minimum: int, maximum: int) -> Convert:
    kind = "a positive integer" if minimum == 1 else "a non-negative integer"

    def convert(value: object) -> int:
        if type(value) is not int or value < minimum:  # type(): a bool is not an int here
            raise _Invalid(f"expected {kind}")
        if value > maximum:
            raise _Invalid(f"must be at most {maximum}")
        return value

    return convert


_SIZE = re.compile(r"([0-9]{1,20}(?:\.[0-9]{1,20})?) ?([A-Za-z]*)")
_SIZE_UNITS = {"": 1, "b": 1, "kib": KiB, "mib": MiB, "gib": GiB}
_AMBIGUOUS_SIZE_UNITS = {"k": "KiB", "kb": "KiB", "m": "MiB", "mb": "MiB", "g": "GiB", "gb": "GiB"}


def _size(minimum: int, maximum: int) -> Convert:
    kind = "a size such as 64KiB, 1MiB or a number of bytes"

    def convert(value: object) -> int:
        if type(value) is int:
            amount = value
        elif isinstance(value, str) and (match := _SIZE.fullmatch(value.strip())):
            number, unit = match.groups()
            if unit.lower() in _AMBIGUOUS_SIZE_UNITS:
                better = _AMBIGUOUS_SIZE_UNITS[unit.lower()]
                raise _Invalid(f"ambiguous unit {unit!r}: write {better} (1024-based) or bytes")
            if unit.lower() not in _SIZE_UNITS:
                raise _Invalid(f"expected {kind}")
            # Exact integer arithmetic (not Decimal: the decimal module costs the daemon
            # about 1 MiB of memory for this one use).
            whole, _, fraction = number.partition(".")
            scale = 10 ** len(fraction)
            scaled = (int(whole) * scale + int(fraction or 0)) * _SIZE_UNITS[unit.lower()]
            if scaled % scale:
                raise _Invalid("must be a whole number of bytes")
            amount = scaled // scale
        else:
            raise _Invalid(f"expected {kind}")
        if amount < minimum:
            raise _Invalid("must be more than 0 bytes" if minimum else f"expected {kind}")
        if amount > maximum:
            raise _Invalid(f"must be at most {_write_size(maximum)}")
        return int(amount)

    return convert


def _write_size(size: int) -> int | str:
    for unit, factor in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return size


_DURATION = re.compile(r"([0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?) ?(ms|s|m|h|d)?")
_DURATION_UNITS_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def _duration(value: object) -> float:
    kind = "a duration such as 30s, 500ms, 2m or a number of seconds"
    if type(value) is int or type(value) is float:
        seconds = value
    elif isinstance(value, str) and (match := _DURATION.fullmatch(value.strip())):
        number, unit = match.groups()
        seconds = float(number) * _DURATION_UNITS_S[unit]
    else:
        raise _Invalid(f"expected {kind}")
    if seconds < 0 or (isinstance(seconds, float) and not math.isfinite(seconds)):
        raise _Invalid(f"expected {kind}")
    if seconds > MAX_DURATION_S:
        raise _Invalid("must be at most 7d")
    return float(seconds) + 0.0  # + 0.0 turns -0.0 into 0.0


def _write_duration(seconds: float) -> str:
    # repr() is the shortest text float() reads back exactly: round trips stay equal.
    return f"{int(seconds)}s" if seconds.is_integer() else f"{seconds!r}s"


def _rate(value: object) -> float:
    """A non-negative, finite number of events per second (ints stay ints for --print-config)."""
    kind = "a number per second (0 turns the limit off)"
    if type(value) is not int and type(value) is not float:  # type(): a bool is no number
        raise _Invalid(f"expected {kind}")
    assert isinstance(value, int | float)
    if not math.isfinite(value) or value < 0:
        raise _Invalid(f"expected {kind}")
    if value > MAX_RATE:
        raise _Invalid(f"must be at most {MAX_RATE}")
    return value + 0.0 if type(value) is float else value  # + 0.0 turns -0.0 into 0.0


def _choice(*choices: str) -> Convert:
    def convert(value: object) -> str:
        if not isinstance(value, str) or value not in choices:
            raise _Invalid(f"expected one of {', '.join(choices)}")
        return value

    return convert


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise _Invalid("expected true or false")
    return value


def _optional_path(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.startswith("/"):
        raise _Invalid("expected an absolute path (the daemon runs from /), or null")
    if problem := _text_problem(value):
        raise _Invalid(problem)
    return value


MAX_WORKERS = 1024


def _workers(value: object) -> int | str:
    if value == "auto":
        return "auto"
    if type(value) is not int or value < 1:  # type(): a bool is not an int here
        raise _Invalid("expected a positive integer or auto")
    if value > MAX_WORKERS:
        raise _Invalid(f"must be at most {MAX_WORKERS}")
    return value


def worker_count(config: Config) -> int:
    """How many worker processes: `auto` is one per CPU this process may run on."""
    if config.workers == "auto":
        return max(1, len(os.sched_getaffinity(0)))
    return config.workers


def _same(value: Any) -> Any:
    return value


# --- the YAML side: nodes, lines, and messages ----------------------------------------

_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _NodeError(Exception):
    """A problem at a node; load_config() prefixes the file name and the node's line."""

    def __init__(self, node: yaml.Node, message: str) -> None:
        super().__init__(message)
        self.node = node


class _NotScalar:
    """Stands for a list or mapping where one value was expected: every converter refuses it."""

    def __init__(self, node: yaml.Node) -> None:
        self.node = node


class _Loader(yaml.SafeLoader):
    """SafeLoader that hands mappings out as (key node, value node) pairs it has checked.

    PyYAML's safe_load keeps the last of duplicate keys without a word; here a duplicate
    is an error naming both lines. Merge keys (<<) are refused: their expansion can grow
    exponentially (a billion laughs) and nothing in this file needs them.
    """

    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        # PyYAML composes recursively, and its scanner is quadratic in flow nesting
        # ("[[[[..." costs seconds before the RecursionError). The schema needs 4 levels.
        if self._depth >= MAX_NESTING:
            mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(
                None, None, f"nested more than {MAX_NESTING} levels deep", mark
            )
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def pairs(self, node: yaml.Node, where: str) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        """The options of a mapping node by name.

        Args:
            node: the node that must be a plain mapping.
            where: the dotted name of the mapping for messages ("" at the top level).

        Raises:
            _NodeError: not a mapping, a key that is not text, a merge key or a duplicate.
        """
        if not isinstance(node, yaml.MappingNode) or node.tag != _MAP_TAG:
            got = _got(self.scalar(node, where), node)
            at = f"{where}: " if where else ""
            raise _NodeError(node, f"{at}expected a mapping of options, got {got}")
        in_where = f" in {where}" if where else ""
        result: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise _NodeError(key_node, f"option names must be text, got {_kind(key_node)}")
            if key_node.tag == _MERGE_TAG:
                raise _NodeError(key_node, f"merge keys (<<) are not supported{in_where}")
            name = key_node.value  # the text as written: `on:` is the name "on", not True
            if name in result:
                first = _line(result[name][0])
                raise _NodeError(
                    key_node,
                    f"duplicate option {_show(name)}{in_where} (first set on line {first})",
                )
            result[name] = (key_node, value_node)
        return result

    def scalar(self, node: yaml.Node, name: str = "") -> object:
        """The Python value of a scalar node, or a _NotScalar for a list or mapping.

        Args:
            node: the value's node.
            name: the dotted option name, for messages.

        Raises:
            _NodeError: the scalar has a tag PyYAML cannot construct, or a malformed value.
        """
        if not isinstance(node, yaml.ScalarNode):
            return _NotScalar(node)
        at = f"{name}: " if name else ""
        try:
            return self.construct_object(node, deep=True)
        except yaml.MarkedYAMLError as e:
            raise _NodeError(node, f"{at}cannot read {_show(node.value)}: {e.problem}") from None
        except Exception:
            # PyYAML 6.0's constructors raise plain ValueError, KeyError or AttributeError
            # for some tagged or odd scalars (`!!bool x`, `!!timestamp x`, `0x_`); each is a
            # mistake in the file, not a bug here.
            raise _NodeError(node, f"{at}cannot read {_show(node.value)}") from None


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def _show(value: object, limit: int = 60) -> str:
    """repr() for a message: one line however odd the value, and never very long."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping" if node.tag == _MAP_TAG else f"a mapping tagged {node.tag}"
    if isinstance(node, yaml.SequenceNode):
        return "a list" if node.tag == _SEQ_TAG else f"a list tagged {node.tag}"
    return _show(node.value)


def _got(value: object, node: yaml.Node) -> str:
    """How an error message shows the value that was refused."""
    if isinstance(value, _NotScalar):
        return _kind(value.node)
    if value is None:
        return "an empty value" if node.value in ("", "~") else "null"
    if isinstance(value, bool):
        return f"a boolean ({node.value})"
    if isinstance(value, str | int | float):
        return _show(value)
    return f"{_show(node.value)} (read by YAML as a {type(value).__name__})"


# --- the agent check and the control socket (issue 23) -----------------------------------


def _read_agent_address(loader: _Loader, node: yaml.Node, name: str) -> ListenAddress | None:
    """null, or one TCP address as a listen entry is written: HAProxy's agent connects
    over TCP and reads one line."""
    if not isinstance(node, yaml.MappingNode) and loader.scalar(node, name) is None:
        return None
    address = _read_address(loader, node, name)
    if address.is_udp or address.family == "unix":
        raise _NodeError(
            node, f"{name}: HAProxy's agent check connects over TCP, got {str(address)!r}"
        )
    if address.proxy_protocol or address.tls:
        raise _NodeError(node, f"{name}: the agent answers plain TCP (no PROXY header, no TLS)")
    return address


def _control_socket(value: object) -> str | None:
    if value is None or value == CONTROL_AUTO:
        return value
    if not isinstance(value, str) or not value.startswith("/"):
        raise _Invalid('expected an absolute path, "auto" or null')
    if problem := _text_problem(value):
        raise _Invalid(problem)
    if len(value.encode()) > MAX_UNIX_PATH_BYTES:
        raise _Invalid(f"a unix socket path is at most {MAX_UNIX_PATH_BYTES} bytes (unix(7))")
    return value


def control_socket_path(config: Config, environ: dict[str, str] | None = None) -> str | None:
    """Where the control socket is: control.socket, or with "auto" the runtime directory
    systemd made for the unit (RuntimeDirectory=, $RUNTIME_DIRECTORY), else None."""
    configured = config.control.socket
    if configured != CONTROL_AUTO:
        return configured
    runtime = (os.environ if environ is None else environ).get("RUNTIME_DIRECTORY", "")
    first = runtime.split(":")[0]  # systemd lists several, colon-separated
    return os.path.join(first, "control.sock") if first.startswith("/") else None


# --- the schema -------------------------------------------------------------------------

# A reader turns a value node into a field value; `name` is the dotted option name.
Read = Callable[[_Loader, yaml.Node, str], Any]


def _scalar(convert: Convert) -> Read:
    def read(loader: _Loader, node: yaml.Node, name: str) -> Any:
        value = loader.scalar(node, name)
        try:
            return convert(value)
        except _Invalid as e:
            raise _NodeError(node, f"{name}: {e}, got {_got(value, node)}") from None

    return read


_MODE = re.compile(r"0?[0-7]{3}")


_ADDRESS_KEYS = ("address", "path", "mode", "proxy_protocol", "tls", "service", "faults")
_LISTEN_TLS_KEYS = ("certificate", "key", "client_ca", "min_version")


def _read_address(loader: _Loader, node: yaml.Node, name: str) -> ListenAddress:
    """One entry of listen: an address string, or a mapping {address|path, mode, proxy_protocol}."""
    if not isinstance(node, yaml.MappingNode):
        return _read_address_text(loader, node, name)
    options = loader.pairs(node, name)
    for key, (key_node, _) in options.items():
        if key not in _ADDRESS_KEYS:
            raise _NodeError(key_node, _unknown(key, name, _ADDRESS_KEYS))
    if "address" in options and "path" in options:
        raise _NodeError(
            options["path"][0], f"{name}: give address or path, not both (path is for unix sockets)"
        )
    if "address" in options:
        address = _read_address_text(loader, options["address"][1], f"{name}.address")
    elif "path" in options:
        address = _read_unix_path(loader, options["path"][1], name)
    elif "mode" in options:
        raise _NodeError(node, f"{name}: a unix socket mapping needs a path")
    else:
        raise _NodeError(node, f"{name}: a listen mapping needs an address (or a unix socket path)")
    if "mode" in options:
        if address.family != "unix":
            raise _NodeError(options["mode"][0], f"{name}.mode: only unix sockets have a mode")
        address = dataclasses.replace(address, mode=_read_mode(loader, options["mode"][1], name))
    if "proxy_protocol" in options:
        flag = _scalar(_boolean)(loader, options["proxy_protocol"][1], f"{name}.proxy_protocol")
        if flag and address.is_udp:
            raise _NodeError(
                options["proxy_protocol"][0],
                f"{name}.proxy_protocol: PROXY headers begin TCP streams; {str(address)!r} is UDP",
            )
        address = dataclasses.replace(address, proxy_protocol=flag)
    if "tls" in options:
        address = _read_listen_tls(loader, options["tls"], address, name)
    if "service" in options:
        address = _read_listen_service(loader, options["service"], address, name)
    if "faults" in options:  # after tls: faults refuse a TLS entry
        address = _read_faults(loader, options["faults"], address, name)
    return address


SERVICES = ("echo", "discard", "chargen", "info")


def _read_listen_service(
    loader: _Loader, pair: tuple[yaml.Node, yaml.Node], address: ListenAddress, name: str
) -> ListenAddress:
    """A listen entry's `service: echo|discard|chargen|info` (services/)."""
    _, node = pair
    value = _scalar(lambda v: v)(loader, node, f"{name}.service")
    if value not in SERVICES:
        raise _NodeError(
            node, f"{name}.service: expected one of {', '.join(SERVICES)}, got {value!r}"
        )
    if value == "chargen" and address.is_udp:
        # RFC 864's UDP form answers each datagram with up to 512 bytes: a classic
        # amplifier for spoofed sources.
        raise _NodeError(
            node,
            f"{name}.service: chargen over UDP is refused (it amplifies spoofed requests);"
            f" {str(address)!r} is UDP",
        )
    return dataclasses.replace(address, service=value)


def _read_listen_tls(
    loader: _Loader, pair: tuple[yaml.Node, yaml.Node], address: ListenAddress, name: str
) -> ListenAddress:
    """A listen entry's `tls: true|false` or `tls: {certificate, key, client_ca, min_version}`."""
    key_node, node = pair
    if address.is_udp:
        raise _NodeError(
            key_node, f"{name}.tls: TLS runs over TCP streams (no DTLS); {str(address)!r} is UDP"
        )
    if not isinstance(node, yaml.MappingNode):
        flag = _scalar(_boolean)(loader, node, f"{name}.tls")
        return dataclasses.replace(address, tls=flag)
    files: dict[str, Any] = {}
    for key, (option_node, value_node) in loader.pairs(node, f"{name}.tls").items():
        if key not in _LISTEN_TLS_KEYS:
            raise _NodeError(option_node, _unknown(key, f"{name}.tls", _LISTEN_TLS_KEYS))
        where = f"{name}.tls.{key}"
        if key == "min_version":
            files[key] = _scalar(_tls_version)(loader, value_node, where)
        else:
            files[key] = _scalar(_tls_file)(loader, value_node, where)
    return dataclasses.replace(
        address, tls=True, **{f"tls_{key}": value for key, value in files.items()}
    )


def _bandwidth(value: object) -> int:
    """Bytes per second: a size, optionally with "/s" (1MiB/s, 64KiB, 500000)."""
    if isinstance(value, str) and value.strip().endswith("/s"):
        value = value.strip()[:-2]
    try:
        return int(_size(1, 10 * GiB)(value))
    except _Invalid:
        raise _Invalid("expected bytes per second such as 1MiB/s, 64KiB/s or 500000") from None


def _fraction(value: object) -> float:
    # type(): a bool is no number
    if not (type(value) is int or type(value) is float) or not 0 <= value <= 1:
        raise _Invalid("expected a fraction from 0 to 1 (0.1 drops one datagram in ten)")
    return float(value) + 0.0


def _write_fraction(value: float) -> float:
    return value


def _optional(write: Callable[[Any], object]) -> Callable[[Any], object]:
    return lambda value: None if value is None else write(value)


# key, Faults field, converter, writer, the transports it applies to
_FAULT_KEYS: tuple[tuple[str, str, Convert, Callable[[Any], object], tuple[str, ...]], ...] = (
    ("delay", "delay_s", _duration, _write_duration, ("tcp", "udp")),
    ("jitter", "jitter_s", _duration, _write_duration, ("tcp", "udp")),
    ("bandwidth", "bandwidth_bytes_per_s", _bandwidth, lambda v: f"{_write_size(v)}/s", ("tcp",)),
    ("close_after_bytes", "close_after_bytes", _integer(0, 2**62), _same, ("tcp",)),
    ("close_after", "close_after_s", _duration, _write_duration, ("tcp",)),
    ("reset_after_bytes", "reset_after_bytes", _integer(0, 2**62), _same, ("tcp",)),
    ("reset_after", "reset_after_s", _duration, _write_duration, ("tcp",)),
    ("drop", "drop", _fraction, _write_fraction, ("udp",)),
)
NO_FAULTS = Faults()


def _read_faults(
    loader: _Loader, pair: tuple[yaml.Node, yaml.Node], address: ListenAddress, name: str
) -> ListenAddress:
    """A listen entry's `faults: {delay, jitter, bandwidth, close_after[_bytes],
    reset_after[_bytes], drop}`; every key is checked at its own line, and a key that does
    not apply to the entry's transport is refused there. All off (or {}) is no faults."""
    _, node = pair
    where = f"{name}.faults"
    if not isinstance(node, yaml.MappingNode):
        raise _NodeError(
            node, f"{where}: expected a mapping such as {{delay: 200ms}}, got {_kind(node)}"
        )
    transport = address.transport
    known = {key: (attr, convert, kinds) for key, attr, convert, _, kinds in _FAULT_KEYS}
    values: dict[str, Any] = {}
    for key, (option_node, value_node) in loader.pairs(node, where).items():
        if key not in known:
            raise _NodeError(option_node, _unknown(key, where, known))
        attr, convert, kinds = known[key]
        if transport not in kinds:
            raise _NodeError(
                option_node,
                f"{where}.{key}: applies to {' and '.join(kinds).upper()} listeners only;"
                f" {str(address)!r} is {transport.upper()}",
            )
        _check_service_fault(option_node, key, address, where)
        values[attr] = _scalar(convert)(loader, value_node, f"{where}.{key}")
    faults = Faults(**values)
    return dataclasses.replace(address, faults=None if faults == NO_FAULTS else faults)


# The fault keys each service other than echo takes (echo takes every key of its
# transport). discard sends nothing, so only its ends apply (counted in bytes received);
# info's line is far smaller than a bandwidth burst; UDP discard answers nothing at all.
_SERVICE_FAULTS: dict[tuple[str, str], tuple[str, ...]] = {
    ("chargen", "tcp"): tuple(key for key, *_, kinds in _FAULT_KEYS if "tcp" in kinds),
    ("discard", "tcp"): ("close_after_bytes", "close_after", "reset_after_bytes", "reset_after"),
    ("info", "tcp"): ("delay", "jitter", "close_after_bytes", "close_after", "reset_after_bytes",
                      "reset_after"),
    ("info", "udp"): ("delay", "jitter", "drop"),
    ("discard", "udp"): (),
}  # fmt: skip


def _check_service_fault(node: yaml.Node, key: str, address: ListenAddress, where: str) -> None:
    """Refuse, at its line, a fault key the entry's service has no use for (faults/services.py
    says what each does; over TLS, faults/tls_services.py gives them the same meanings)."""
    service = address.service
    if service == "echo":
        return
    allowed = _SERVICE_FAULTS[service, address.transport]
    if key not in allowed:
        takes = f"takes only {', '.join(allowed)}" if allowed else "takes no faults"
        raise _NodeError(
            node,
            f"{where}.{key}: a {address.transport.upper()} {service} listener {takes}",
        )


CREDENTIAL_PREFIX = "credential:"


def _tls_file(value: object) -> str | None:
    """A TLS file: an absolute path, or `credential:NAME` for a systemd credential
    (LoadCredential=NAME:/path in the unit), found in $CREDENTIALS_DIRECTORY/NAME.

    Resolved when the file is read, so what is checked, served and printed is the path;
    systemd copies a credential once, when the service starts.
    """
    if not (isinstance(value, str) and value.startswith(CREDENTIAL_PREFIX)):
        return _optional_path(value)
    name = value[len(CREDENTIAL_PREFIX) :]
    if not name or "/" in name or name in (".", "..") or _text_problem(name):
        raise _Invalid("expected credential:NAME with a credential name (no /)")
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        raise _Invalid(
            "a credential needs $CREDENTIALS_DIRECTORY, which systemd sets for a unit with"
            f" LoadCredential={name}:/path/to/file; it is not set"
        )
    return os.path.join(directory, name)


def _tls_version(value: object) -> str:
    """ "1.2" or "1.3"; YAML reads the unquoted 1.2 as a float, accepted as written."""
    if value in ("1.2", "1.3") or (type(value) is float and value in (1.2, 1.3)):
        return str(value)
    raise _Invalid('expected "1.2" or "1.3"')


def _read_sni(loader: _Loader, node: yaml.Node, name: str) -> tuple[SniEntry, ...]:
    """tls.sni: a list of {names: [...], certificate, key}."""
    if not isinstance(node, yaml.SequenceNode) or node.tag != _SEQ_TAG:
        got = _got(loader.scalar(node, name), node)
        raise _NodeError(
            node, f"{name}: expected a list of {{names, certificate, key}} mappings, got {got}"
        )
    entries: list[SniEntry] = []
    seen: dict[str, int] = {}
    for index, item in enumerate(node.value):
        where = f"{name}[{index}]"
        options = loader.pairs(item, where)
        for key, (key_node, _) in options.items():
            if key not in ("names", "certificate", "key"):
                raise _NodeError(key_node, _unknown(key, where, ("names", "certificate", "key")))
        for needed in ("names", "certificate", "key"):
            if needed not in options:
                raise _NodeError(item, f"{where}: needs {needed}")
        names_node = options["names"][1]
        if not isinstance(names_node, yaml.SequenceNode) or not names_node.value:
            raise _NodeError(names_node, f'{where}.names: expected a list such as ["a.example"]')
        names: list[str] = []
        for name_node in names_node.value:
            text = loader.scalar(name_node, f"{where}.names")
            if not isinstance(text, str) or not _SNI_NAME.fullmatch(text):
                raise _NodeError(
                    name_node,
                    f'{where}.names: expected a host name such as "a.example" or'
                    f' "*.b.example", got {_got(text, name_node)}',
                )
            lowered = text.lower()
            if lowered in seen:
                raise _NodeError(
                    name_node, f"{where}.names: {text!r} is listed twice (line {seen[lowered]})"
                )
            seen[lowered] = _line(name_node)
            names.append(lowered)
        certificate = _scalar(_tls_file)(loader, options["certificate"][1], f"{where}.certificate")
        key = _scalar(_tls_file)(loader, options["key"][1], f"{where}.key")
        if certificate is None or key is None:
            raise _NodeError(item, f"{where}: certificate and key must both be set")
        entries.append(SniEntry(tuple(names), certificate, key))
    return tuple(entries)


_SNI_NAME = re.compile(r"(\*\.)?([A-Za-z0-9-]{1,63}\.)*[A-Za-z0-9-]{1,63}")


def _write_sni(entries: tuple[SniEntry, ...]) -> list[object]:
    return [{"names": list(e.names), "certificate": e.certificate, "key": e.key} for e in entries]


def _read_unix_path(loader: _Loader, path_node: yaml.Node, name: str) -> ListenAddress:
    """The path of a {path: ...} listen mapping as a unix ListenAddress."""
    path = loader.scalar(path_node, f"{name}.path")
    if not isinstance(path, str):
        raise _NodeError(path_node, f"{name}.path: expected a path, got {_got(path, path_node)}")
    try:
        return ListenAddress("unix", path=_check_unix_path(path))
    except ValueError as e:
        raise _NodeError(path_node, f"{name}.path: {e}") from None


def _read_mode(loader: _Loader, mode_node: yaml.Node, name: str) -> int:
    # The mode is read from the text as written, like chmod: 0660, "0660" and 660 all
    # mean rw-rw----, although YAML alone would read 0660 as octal and 660 as decimal.
    if not (isinstance(mode_node, yaml.ScalarNode) and _MODE.fullmatch(mode_node.value)):
        got = _got(loader.scalar(mode_node, f"{name}.mode"), mode_node)
        raise _NodeError(
            mode_node, f'{name}.mode: expected an octal mode such as "0660", got {got}'
        )
    return int(mode_node.value, 8)


def _read_address_text(loader: _Loader, node: yaml.Node, name: str) -> ListenAddress:
    value = loader.scalar(node, name)
    if not isinstance(value, str):
        raise _NodeError(
            node, f'{name}: expected an address such as "127.0.0.1:7080", got {_got(value, node)}'
        )
    try:
        return parse_address(value)
    except ValueError as e:
        raise _NodeError(node, f"{name}: {e}") from None


def _read_listen(loader: _Loader, node: yaml.Node, name: str) -> tuple[ListenAddress, ...]:
    if not isinstance(node, yaml.SequenceNode) or node.tag != _SEQ_TAG:
        got = _got(loader.scalar(node, name), node)
        raise _NodeError(
            node, f'{name}: expected a list of addresses such as ["127.0.0.1:7080"], got {got}'
        )
    if not node.value:
        raise _NodeError(node, f"{name}: the list is empty; epolld needs at least one address")
    addresses: list[ListenAddress] = []
    first: dict[object, tuple[ListenAddress, int]] = {}  # socket or port -> (address, line)
    for index, item in enumerate(node.value):
        address = _read_address(loader, item, f"{name}[{index}]")
        for key in _conflict_keys(address):
            if key in first:
                other, line = first[key]
                if key[0] == "socket":
                    problem = f"duplicate address {str(address)!r} (first listed on line {line})"
                else:
                    problem = (
                        f"{str(address)!r} and {str(other)!r} (line {line}) cannot both be"
                        f" bound: a wildcard address takes its port on every address"
                    )
                raise _NodeError(item, f"{name}[{index}]: {problem}")
        for key in _own_keys(address):
            first.setdefault(key, (address, _line(item)))
        addresses.append(address)
    return tuple(addresses)


# Two listen entries collide when they name the same socket (a mode does not make a second
# one), or when one is the wildcard (0.0.0.0, [::]) of the other's family and port: bind(2)
# then fails with EADDRINUSE. listeners.bind() sets IPV6_V6ONLY, so [::] and 0.0.0.0 do not
# collide, and port 0 never does. TCP and UDP ports are separate name spaces.


def _own_keys(a: ListenAddress) -> list[tuple[object, ...]]:
    """What a takes: its socket, and its port (as a wildcard or as a specific address)."""
    keys: list[tuple[object, ...]] = [("socket", a.transport, a.family, a.host, a.port, a.path)]
    if a.family != "unix" and a.port:
        keys.append(("port", a.transport, a.family, a.port, _is_wildcard(a)))
    return keys


def _conflict_keys(a: ListenAddress) -> list[tuple[object, ...]]:
    """What a cannot share: its socket; a port taken by a wildcard; any address, if a is one."""
    keys: list[tuple[object, ...]] = [("socket", a.transport, a.family, a.host, a.port, a.path)]
    if a.family != "unix" and a.port:
        keys.append(("port", a.transport, a.family, a.port, True))
        if _is_wildcard(a):
            keys.append(("port", a.transport, a.family, a.port, False))
    return keys


def _is_wildcard(a: ListenAddress) -> bool:
    return ipaddress.ip_address(a.host).is_unspecified


def _read_ports(loader: _Loader, node: yaml.Node, name: str) -> tuple[int, ...]:
    """A list of distinct port numbers, each checked at its own line."""
    if not isinstance(node, yaml.SequenceNode) or node.tag != _SEQ_TAG:
        got = _got(loader.scalar(node, name), node)
        raise _NodeError(
            node, f"{name}: expected a list of port numbers such as [0, 7, 19], got {got}"
        )
    ports: list[int] = []
    for index, item in enumerate(node.value):
        number = loader.scalar(item, f"{name}[{index}]")
        if type(number) is not int or not 0 <= number <= 65535:  # type(): a bool is no port
            got = _got(number, item)
            raise _NodeError(item, f"{name}[{index}]: expected a port number 0-65535, got {got}")
        if number in ports:
            raise _NodeError(item, f"{name}[{index}]: port {number} is listed twice")
        ports.append(number)
    return tuple(ports)


def _write_ports(ports: tuple[int, ...]) -> list[int]:
    return list(ports)


def _write_address(a: ListenAddress) -> object:
    if (
        a.mode is None
        and not a.proxy_protocol
        and not a.tls
        and a.service == "echo"
        and a.faults is None
    ):
        return str(a)
    entry: dict[str, object] = (
        {"address": str(a)} if a.mode is None else {"path": a.path, "mode": f"{a.mode:04o}"}
    )
    if a.proxy_protocol:
        entry["proxy_protocol"] = True
    if a.tls:
        files = {
            name: getattr(a, f"tls_{name}")
            for name in _LISTEN_TLS_KEYS
            if getattr(a, f"tls_{name}") is not None
        }
        entry["tls"] = files or True
    if a.service != "echo":
        entry["service"] = a.service
    if a.faults is not None:
        entry["faults"] = a.faults.active()
    return entry


def _write_listen(addresses: tuple[ListenAddress, ...]) -> list[object]:
    return [_write_address(a) for a in addresses]


def _read_trusted(loader: _Loader, node: yaml.Node, name: str) -> tuple[IpNetwork, ...]:
    """proxy.trusted: a non-empty list of networks in CIDR notation (an address is a /32)."""
    if not isinstance(node, yaml.SequenceNode) or node.tag != _SEQ_TAG:
        got = _got(loader.scalar(node, name), node)
        raise _NodeError(
            node, f'{name}: expected a list of networks such as ["10.0.0.0/8"], got {got}'
        )
    if not node.value:
        raise _NodeError(
            node, f"{name}: the list is empty; no proxy could send a header (list their networks)"
        )
    networks: list[IpNetwork] = []
    for index, item in enumerate(node.value):
        value = loader.scalar(item, f"{name}[{index}]")
        if not isinstance(value, str):
            got = _got(value, item)
            raise _NodeError(
                item, f'{name}[{index}]: expected a network such as "10.0.0.0/8", got {got}'
            )
        try:
            networks.append(ipaddress.ip_network(value.strip()))
        except ValueError as e:
            if "has host bits set" not in str(e):
                problem = f"expected an IPv4 or IPv6 network in CIDR notation, got {_show(value)}"
            else:
                meant = str(ipaddress.ip_network(value.strip(), strict=False))
                problem = f"{_show(value)} has host bits set (did you mean {meant!r}?)"
            raise _NodeError(item, f"{name}[{index}]: {problem}") from None
    return tuple(networks)


def _write_trusted(networks: tuple[IpNetwork, ...]) -> list[str]:
    return [str(n) for n in networks]


def _positive_duration(value: object) -> float:
    seconds = _duration(value)
    if seconds <= 0:
        raise _Invalid("must be more than 0s (a header must arrive in bounded time)")
    return seconds


def _read_optional_address(loader: _Loader, node: yaml.Node, name: str) -> ListenAddress | None:
    """null, or one address as a listen entry is written."""
    if not isinstance(node, yaml.MappingNode):
        value = loader.scalar(node, name)
        if value is None:
            return None
        if not isinstance(value, str):
            raise _NodeError(
                node,
                f'{name}: expected an address such as "127.0.0.1:9707", or null,'
                f" got {_got(value, node)}",
            )
    address = _read_address(loader, node, name)
    if address.is_udp:  # Prometheus scrapes over HTTP, which needs a stream
        raise _NodeError(
            node, f"{name}: the metrics endpoint is HTTP over TCP, got {str(address)!r}"
        )
    if address.proxy_protocol:
        flag = loader.pairs(node, name)["proxy_protocol"][0]
        raise _NodeError(flag, f"{name}.proxy_protocol: only echo listeners take PROXY headers")
    if address.tls:
        flag = loader.pairs(node, name)["tls"][0]
        raise _NodeError(flag, f"{name}.tls: the metrics endpoint serves plain HTTP")
    if address.service != "echo":
        flag = loader.pairs(node, name)["service"][0]
        raise _NodeError(flag, f"{name}.service: the metrics endpoint serves HTTP only")
    return address


def _write_optional_address(address: ListenAddress | None) -> object:
    return None if address is None else _write_address(address)


def _check_metrics_apart(loader: _Loader, root: yaml.Node, config: Config) -> None:
    """metrics.listen must be bindable beside every echo address, or binding fails later.

    Raises:
        _NodeError: at metrics.listen, naming the echo address it collides with.
    """
    metrics = config.metrics.listen
    if metrics is None or (metrics.family != "unix" and metrics.port == 0):
        return  # the kernel gives each port-0 socket a port of its own
    top = loader.pairs(root, "")
    listen_items = top["listen"][1].value if "listen" in top else []
    node = loader.pairs(top["metrics"][1], "metrics")["listen"][1]
    taken = set(_conflict_keys(metrics))
    for index, address in enumerate(config.listen):
        if taken.isdisjoint(_own_keys(address)):
            continue
        where = (
            f"listen[{index}], line {_line(listen_items[index])}"
            if listen_items
            else "the default listen"
        )
        raise _NodeError(
            node,
            f"metrics.listen: {str(metrics)!r} and {str(address)!r} ({where}) cannot both be"
            " bound: the metrics endpoint needs a socket of its own",
        )


def _check_tls(loader: _Loader, root: yaml.Node, config: Config) -> None:
    """Every TLS listener has a certificate and key, and every configured file can be used
    (read, PEM, the key matching its certificate): checked now, so that a start or a
    reload with a file that cannot serve fails here, naming the file.

    Raises:
        _NodeError: at the option naming the file, or at the listen entry lacking one.
    """
    section = config.tls
    top = loader.pairs(root, "")
    used = [a for a in config.listen if a.tls]
    if not used and section == TlsConfig():
        return
    from epolld.tls import certs  # imports ssl: only when TLS is configured

    section_nodes = loader.pairs(top["tls"][1], "tls") if "tls" in top else {}

    def at(name: str) -> yaml.Node:
        return section_nodes[name][1] if name in section_nodes else root

    def check(problem: str | None, node: yaml.Node, name: str) -> None:
        if problem is not None:
            raise _NodeError(node, f"{name}: {problem}")

    if (section.certificate is None) != (section.key is None):
        missing = "key" if section.key is None else "certificate"
        present = "certificate" if missing == "key" else "key"
        raise _NodeError(at(present), f"tls.{present} is set without tls.{missing}")
    checked: set[tuple[str, str]] = set()
    if section.certificate is not None and section.key is not None:
        check(certs.check_certificate(section.certificate), at("certificate"), "tls.certificate")
        check(certs.check_key(section.key), at("key"), "tls.key")
        check(certs.check_pair(section.certificate, section.key), at("key"), "tls.key")
        checked.add((section.certificate, section.key))
    if section.client_ca is not None:
        check(certs.check_ca(section.client_ca), at("client_ca"), "tls.client_ca")
    if section.sni:
        sni_nodes = section_nodes["sni"][1].value
        for index, entry in enumerate(section.sni):
            node, name = sni_nodes[index], f"tls.sni[{index}]"
            check(certs.check_certificate(entry.certificate), node, f"{name}.certificate")
            check(certs.check_key(entry.key), node, f"{name}.key")
            check(certs.check_pair(entry.certificate, entry.key), node, f"{name}.key")
    listen_items = top["listen"][1].value if "listen" in top else []
    for index, address in enumerate(config.listen):
        if not address.tls:
            continue
        item = listen_items[index]
        name = f"listen[{index}].tls"
        certificate = address.tls_certificate or section.certificate
        key = address.tls_key or section.key
        if certificate is None or key is None:
            missing = "certificate" if certificate is None else "key"
            raise _NodeError(
                item,
                f"{name}: a TLS listener needs a {missing}: set tls.{missing}"
                f" (or this entry's tls: {{{missing}: ...}})",
            )
        if (certificate, key) not in checked:
            check(certs.check_certificate(certificate), item, f"{name}.certificate")
            check(certs.check_key(key), item, f"{name}.key")
            check(certs.check_pair(certificate, key), item, f"{name}.key")
            checked.add((certificate, key))
        if address.tls_client_ca is not None:
            check(certs.check_ca(address.tls_client_ca), item, f"{name}.client_ca")


@dataclass(frozen=True, slots=True)
class _Option:
    key: str  # the name in the YAML file
    attr: str  # the dataclass field, which carries the unit (_s, _bytes)
    read: Read
    write: Callable[[Any], object]  # field value -> YAML value that read() turns back into it


@dataclass(frozen=True, slots=True)
class _Section:
    key: str
    attr: str
    cls: type[Any]
    entries: tuple[_Option, ...]


_Entry = _Option | _Section

_SCHEMA: tuple[_Entry, ...] = (
    _Option("listen", "listen", _read_listen, _write_listen),
    _Option("backlog", "backlog", _scalar(_integer(1, 65535)), _same),
    _Option("trigger", "trigger", _scalar(_choice("level", "edge")), _same),
    _Option("io", "io", _scalar(_choice("copy", "splice")), _same),
    _Section("buffers", "buffers", BuffersConfig, (
        _Option("read_size", "read_size_bytes", _scalar(_size(1, 64 * MiB)), _write_size),
        _Option("high_water", "high_water_bytes", _scalar(_size(1, 1 * GiB)), _write_size),
        _Option("low_water", "low_water_bytes", _scalar(_size(0, 1 * GiB)), _write_size),
    )),
    _Section("limits", "limits", LimitsConfig, (
        _Option("max_connections", "max_connections", _scalar(_integer(1, 10_000_000)), _same),
        _Option("max_connections_per_ip", "max_connections_per_ip",
                _scalar(_integer(0, 10_000_000)), _same),
        _Option("idle_timeout", "idle_timeout_s", _scalar(_duration), _write_duration),
    )),
    _Option("shutdown_timeout", "shutdown_timeout_s", _scalar(_duration), _write_duration),
    _Section("logging", "logging", LoggingConfig, (
        _Option("level", "level",
                _scalar(_choice("trace", "debug", "info", "warning", "error")), _same),
        _Option("format", "format", _scalar(_choice("auto", "json", "console")), _same),
        _Option("connections", "connections", _scalar(_boolean), _same),
    )),
    _Option("stats_interval", "stats_interval_s", _scalar(_duration), _write_duration),
    _Option("watchdog", "watchdog", _scalar(_boolean), _same),
    _Section("daemon", "daemon", DaemonConfig, (
        _Option("pidfile", "pidfile", _scalar(_optional_path), _same),
        _Option("log_file", "log_file", _scalar(_optional_path), _same),
    )),
    _Section("udp", "udp", UdpConfig, (
        _Option("rate", "rate", _scalar(_rate), _same),
        _Option("burst", "burst", _scalar(_integer(1, MAX_RATE)), _same),
        _Option("byte_rate", "byte_rate_bytes", _scalar(_size(0, 1 * GiB)), _write_size),
        _Option("total_rate", "total_rate", _scalar(_rate), _same),
        _Option("sources", "sources", _scalar(_integer(1, 1_000_000)), _same),
        _Option("refuse_source_ports", "refuse_source_ports", _read_ports, _write_ports),
        _Option("max_datagram", "max_datagram_bytes",
                _scalar(_size(1, MAX_UDP_PAYLOAD_BYTES)), _write_size),
    )),
    _Section("proxy", "proxy", ProxyConfig, (
        _Option("trusted", "trusted", _read_trusted, _write_trusted),
        _Option("timeout", "timeout_s", _scalar(_positive_duration), _write_duration),
    )),
    _Section("metrics", "metrics", MetricsConfig, (
        _Option("listen", "listen", _read_optional_address, _write_optional_address),
    )),
    _Section("agent", "agent", AgentConfig, (
        _Option("listen", "listen", _read_agent_address, _write_optional_address),
    )),
    _Section("control", "control", ControlConfig, (
        _Option("socket", "socket", _scalar(_control_socket), _same),
    )),
    _Section("tls", "tls", TlsConfig, (
        _Option("certificate", "certificate", _scalar(_tls_file), _same),
        _Option("key", "key", _scalar(_tls_file), _same),
        _Option("client_ca", "client_ca", _scalar(_tls_file), _same),
        _Option("min_version", "min_version", _scalar(_tls_version), _same),
        _Option("handshake_timeout", "handshake_timeout_s", _scalar(_positive_duration),
                _write_duration),
        _Option("sni", "sni", _read_sni, _write_sni),
    )),
    _Option("workers", "workers", _scalar(_workers), _same),
)  # fmt: skip


def _unknown(key: str, where: str, known: Iterable[str]) -> str:
    """The message for an unknown option, with the likeliest intended name.

    An option put in the wrong section ("idle_timeout" at the top level) is pointed to its
    place ("limits.idle_timeout"); otherwise the closest known name is offered, if any.
    """
    in_where = f" in {where}" if where else ""
    message = f"unknown option {_show(key)}{in_where}"
    everywhere = [e.key for e in _SCHEMA] + [
        f"{e.key}.{o.key}" for e in _SCHEMA if isinstance(e, _Section) for o in e.entries
    ]
    if where in ("", *(e.key for e in _SCHEMA)):  # a schema section, not a listen entry
        for name in everywhere:
            section, _, option = name.rpartition(".")
            if option == key and section != where:
                return f"{message} (did you mean {name!r}?)"
    import difflib  # only on this error path: it is not needed to run

    close = difflib.get_close_matches(key, list(known), n=1)
    return f"{message} (did you mean {close[0]!r}?)" if close else message


def _read_entries(
    loader: _Loader, node: yaml.Node, entries: tuple[_Entry, ...], where: str
) -> dict[str, Any]:
    """Read a mapping node against entries; returns dataclass keyword arguments."""
    options = loader.pairs(node, where)
    by_key = {e.key: e for e in entries}
    prefix = f"{where}." if where else ""
    kwargs: dict[str, Any] = {}
    for key, (key_node, value_node) in options.items():
        entry = by_key.get(key)
        if entry is None:
            raise _NodeError(key_node, _unknown(key, where, by_key))
        if isinstance(entry, _Section):
            kwargs[entry.attr] = _read_section(loader, key_node, value_node, entry)
        else:
            kwargs[entry.attr] = entry.read(loader, value_node, prefix + key)
    return kwargs


def _read_section(loader: _Loader, key_node: yaml.Node, node: yaml.Node, section: _Section) -> Any:
    if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
        return section.cls()  # `limits:` with every option commented out
    kwargs = _read_entries(loader, node, section.entries, section.key)
    result = section.cls(**kwargs)
    if isinstance(result, BuffersConfig) and result.low_water_bytes >= result.high_water_bytes:
        options = loader.pairs(node, section.key)
        blame = options.get("low_water", options.get("high_water", (key_node, node)))[1]
        raise _NodeError(
            blame,
            f"buffers.low_water ({_write_size(result.low_water_bytes)}) must be below"
            f" buffers.high_water ({_write_size(result.high_water_bytes)})",
        )
    return result


# --- reading the file ---------------------------------------------------------------------


def _read_text(path: str) -> str:
    """The file's text, with one clear message for each way it can fail to be one."""
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"{path}: is a directory, not a configuration file")
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block, /dev/zero would never end
            raise ConfigError(f"{path}: not a regular file")
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied (running as uid {os.geteuid()})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except ValueError:  # a NUL in the path
        raise ConfigError(f"{path!r}: not a valid file name") from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(
            f"{path}: larger than {MAX_FILE_BYTES // MiB} MiB, not a configuration file"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        before = data[: e.start]
        line = before.count(b"\n") + 1
        column = e.start - (before.rfind(b"\n") + 1) + 1
        raise ConfigError(
            f"{path}:{line}:{column}: not UTF-8 text (byte 0x{data[e.start]:02x}); save it as UTF-8"
        ) from None


_UNQUOTED_IPV6 = re.compile(r"^\s*(-\s*)?\[[0-9A-Fa-f:.]*\]:")


def _syntax_error(path: str, text: str, error: yaml.YAMLError) -> ConfigError:
    """path:line:column: the problem, and the offending line quoted.

    All on one line: the message also goes to the journal and to systemd's STATUS=.
    """
    if isinstance(error, yaml.reader.ReaderError):  # a character YAML does not allow
        lines = (text[: error.position] + "x").splitlines()  # YAML's line breaks too
        return ConfigError(
            f"{path}:{len(lines)}:{len(lines[-1])}: character U+{error.character:04X}"
            " is not allowed in YAML"
        )
    if not isinstance(error, yaml.MarkedYAMLError) or error.problem_mark is None:
        return ConfigError(f"{path}: {' '.join(str(error).split())}")
    mark = error.problem_mark
    message = f"{path}:{mark.line + 1}:{mark.column + 1}: {error.problem or error.context}"
    if error.problem and error.context and error.context_mark is not None:
        message += f" ({error.context} at line {error.context_mark.line + 1})"
    lines = text.splitlines()
    if mark.line < len(lines):
        line = lines[mark.line]
        message += f", in {_excerpt(line, mark.column)}"
        if _UNQUOTED_IPV6.match(line):
            message += ' (quote IPv6 addresses: "[::1]:7080")'
    return ConfigError(message)


def _excerpt(line: str, column: int, width: int = 60) -> str:
    """The line quoted, or the part of it around column when it is long."""
    start = max(0, min(column - width // 2, len(line) - width))
    before = "..." if start else ""
    after = "..." if start + width < len(line) else ""
    return f"{before}{line[start : start + width]!r}{after}"


def load_config(path: str) -> Config:
    """Read and validate the YAML file at path.

    An empty file, or one holding only comments, gives the defaults.

    Args:
        path: the configuration file; also kept as Config.source.

    Raises:
        ConfigError: the file is missing, unreadable or invalid; str() is the whole message,
            starting with the path and, when there is one, the line.
    """
    return parse_config(_read_text(path), path)


def parse_config(text: str, path: str) -> Config:
    """Validate configuration text as if read from path (a restart handoff carries the
    previous process's configuration as text, see epolld/handoff.py).

    Raises:
        ConfigError: as load_config.
    """
    try:
        loader = _Loader(text)
    except yaml.YAMLError as e:  # the reader checks every character up front
        raise _syntax_error(path, text, e) from None
    try:
        root = loader.get_single_node()
        if root is None or (isinstance(root, yaml.ScalarNode) and loader.scalar(root) is None):
            return Config(source=path)
        if not isinstance(root, yaml.MappingNode):
            raise _NodeError(root, f"the top level must be a mapping of options, got {_kind(root)}")
        config = Config(**_read_entries(loader, root, _SCHEMA, ""), source=path)
        _check_metrics_apart(loader, root, config)
        _check_tls(loader, root, config)
        return config
    except yaml.YAMLError as e:
        raise _syntax_error(path, text, e) from None
    except _NodeError as e:
        raise ConfigError(f"{path}:{_line(e.node)}: {e}") from None
    finally:
        loader.dispose()


# --- writing and comparing ------------------------------------------------------------


def _to_data(obj: Any, entries: tuple[_Entry, ...]) -> dict[str, object]:
    return {
        e.key: _to_data(getattr(obj, e.attr), e.entries)
        if isinstance(e, _Section)
        else e.write(getattr(obj, e.attr))
        for e in entries
    }


_UNICODE_BREAKS = ("\x85", "\u2028", "\u2029")  # NEL, LINE and PARAGRAPH SEPARATOR


def render_config(config: Config) -> str:
    """The effective configuration, every default filled in, as YAML for --print-config.

    load_config() reads the text back to a Config equal to this one but for source.

    Args:
        config: the configuration to write out.
    """
    data = _to_data(config, _SCHEMA)
    body = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False)
    if any(c in body for c in _UNICODE_BREAKS):
        # PyYAML 6.0 writes these line breaks raw inside a quoted scalar, and reads them back
        # as a space: escape everything non-ASCII instead, as "\x85".
        body = yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
    return "# epolld effective configuration (defaults filled in)\n" + body


def describe(config: Config) -> str:
    """One line for --check-config: listeners, trigger and I/O modes, the metrics endpoint."""
    listeners = " ".join(
        f"{a}{' (PROXY)' if a.proxy_protocol else ''}{' (TLS)' if a.tls else ''}"
        f"{f' ({a.service})' if a.service != 'echo' else ''}"
        f"{' (faults)' if a.faults else ''}"
        for a in config.listen
    )
    text = f"listeners: {listeners}; trigger: {config.trigger}; io: {config.io}"
    if config.metrics.listen is not None:
        text += f"; metrics: {config.metrics.listen}"
    if config.agent.listen is not None:
        text += f"; agent: {config.agent.listen}"
    if config.workers != 1:
        text += f"; workers: {config.workers}"
    return text


def _flatten(obj: Any, entries: tuple[_Entry, ...], prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for e in entries:
        value = getattr(obj, e.attr)
        if isinstance(e, _Section):
            flat.update(_flatten(value, e.entries, f"{prefix}{e.key}."))
        elif e.key == "listen" and not prefix:
            flat[e.key] = [_address_text(a) for a in value]
        elif e.key == "trusted":
            flat[prefix + e.key] = [str(n) for n in value]
        elif e.key == "sni":
            flat[prefix + e.key] = _write_sni(value)
        elif isinstance(value, ListenAddress):
            flat[prefix + e.key] = _address_text(value)
        else:
            flat[prefix + e.key] = value
    return flat


def changes(old: Config, new: Config) -> dict[str, tuple[object, object]]:
    """The options that differ, for the config_reloaded log event.

    Args:
        old: the configuration running so far.
        new: the configuration being applied.

    Returns:
        dotted YAML option name ("limits.idle_timeout") -> (old value, new value); values
        as in the dataclasses (seconds, bytes), listen as a list of address strings.
    """
    before, after = _flatten(old, _SCHEMA), _flatten(new, _SCHEMA)
    return {name: (before[name], after[name]) for name in before if before[name] != after[name]}
