"""The PROXY protocol's configuration: listen mappings, the proxy section, their messages."""

from __future__ import annotations

import ipaddress
import pathlib

import pytest

from epolld.config import (
    DEFAULT_TRUSTED,
    Config,
    ListenAddress,
    ProxyConfig,
    changes,
    describe,
    load_config,
    render_config,
)
from epolld.errors import ConfigError


def load(tmp_path: pathlib.Path, text: str) -> Config:
    path = tmp_path / "epolld.yaml"
    path.write_text(text, encoding="utf-8")
    return load_config(str(path))


def error(tmp_path: pathlib.Path, text: str) -> str:
    """The message without the path in front."""
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    return str(info.value).split("epolld.yaml", 1)[1]


def test_defaults() -> None:
    """Without a proxy section only loopback may send headers, within 5 seconds."""
    assert Config().proxy == ProxyConfig(
        (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")), 5.0
    )
    assert Config().proxy.trusted == DEFAULT_TRUSTED
    assert not any(a.proxy_protocol for a in Config().listen)


def test_listen_mappings(tmp_path: pathlib.Path) -> None:
    """Strings stay plain listeners; mappings may name an address or path and opt in."""
    config = load(
        tmp_path,
        'listen:\n  - "127.0.0.1:7080"\n'
        '  - {address: "[::1]:7081", proxy_protocol: true}\n'
        '  - {address: "127.0.0.1:7082", proxy_protocol: false}\n'
        '  - {path: /run/e.sock, mode: "0660", proxy_protocol: true}\n'
        '  - {address: "unix:/run/f.sock", mode: "0600"}\n',
    )
    assert config.listen == (
        ListenAddress("ipv4", host="127.0.0.1", port=7080),
        ListenAddress("ipv6", host="::1", port=7081, proxy_protocol=True),
        ListenAddress("ipv4", host="127.0.0.1", port=7082),
        ListenAddress("unix", path="/run/e.sock", mode=0o660, proxy_protocol=True),
        ListenAddress("unix", path="/run/f.sock", mode=0o600),
    )


def test_proxy_section(tmp_path: pathlib.Path) -> None:
    """trusted takes networks and single addresses of both families; timeout a duration."""
    config = load(
        tmp_path,
        'proxy:\n  trusted: ["10.0.0.0/8", "192.0.2.7", "2001:db8::/32"]\n  timeout: 1500ms\n',
    )
    assert config.proxy == ProxyConfig(
        (
            ipaddress.ip_network("10.0.0.0/8"),
            ipaddress.ip_network("192.0.2.7/32"),
            ipaddress.ip_network("2001:db8::/32"),
        ),
        1.5,
    )


def test_empty_proxy_section_is_the_defaults(tmp_path: pathlib.Path) -> None:
    """`proxy:` with every option commented out keeps the defaults."""
    assert load(tmp_path, "proxy:\n").proxy == ProxyConfig()


ERRORS = [
    pytest.param(
        'listen: [{address: "127.0.0.1:1", path: /x}]\n',
        ":1: listen[0]: give address or path, not both (path is for unix sockets)",
        id="address-and-path",
    ),
    pytest.param(
        "listen: [{proxy_protocol: true}]\n",
        ":1: listen[0]: a listen mapping needs an address (or a unix socket path)",
        id="no-address",
    ),
    pytest.param(
        'listen: [{address: "127.0.0.1:1", mode: "0600"}]\n',
        ":1: listen[0].mode: only unix sockets have a mode",
        id="mode-on-tcp",
    ),
    pytest.param(
        'listen:\n  - {address: "127.0.0.1:1", proxy_protocol: "yes"}\n',
        ":2: listen[0].proxy_protocol: expected true or false, got 'yes'",
        id="quoted-boolean",
    ),
    pytest.param(
        'listen: [{address: "localhost:1"}]\n',
        ":1: listen[0].address: expected an IP address (host names are not resolved) such as"
        " 127.0.0.1:7080 or [::1]:7080, got 'localhost:1'",
        id="host-name",
    ),
    pytest.param(
        'listen: [{adress: "127.0.0.1:1"}]\n',
        ":1: unknown option 'adress' in listen[0] (did you mean 'address'?)",
        id="typo",
    ),
    pytest.param(
        'listen:\n  - "127.0.0.1:1"\n  - {address: "127.0.0.1:1", proxy_protocol: true}\n',
        ":3: listen[1]: duplicate address '127.0.0.1:1' (first listed on line 2)",
        id="same-socket-with-and-without",
    ),
    pytest.param(
        "proxy:\n  trusted: 10.0.0.0/8\n",
        ":2: proxy.trusted: expected a list of networks such as [\"10.0.0.0/8\"], got '10.0.0.0/8'",
        id="trusted-not-a-list",
    ),
    pytest.param(
        "proxy:\n  trusted: []\n",
        ":2: proxy.trusted: the list is empty; no proxy could send a header (list their networks)",
        id="trusted-empty",
    ),
    pytest.param(
        "proxy:\n  trusted:\n    - 10.0.0.0/8\n    - 10.0.0.1/8\n",
        ":4: proxy.trusted[1]: '10.0.0.1/8' has host bits set (did you mean '10.0.0.0/8'?)",
        id="host-bits",
    ),
    pytest.param(
        "proxy:\n  trusted: [proxy.example]\n",
        ":2: proxy.trusted[0]: expected an IPv4 or IPv6 network in CIDR notation,"
        " got 'proxy.example'",
        id="trusted-name",
    ),
    pytest.param(
        "proxy:\n  trusted: [10.0.0.0/33]\n",
        ":2: proxy.trusted[0]: expected an IPv4 or IPv6 network in CIDR notation,"
        " got '10.0.0.0/33'",
        id="prefix-too-long",
    ),
    pytest.param(
        "proxy:\n  trusted: [8]\n",
        ':2: proxy.trusted[0]: expected a network such as "10.0.0.0/8", got 8',
        id="trusted-number",
    ),
    pytest.param(
        "proxy:\n  timeout: 0\n",
        ":2: proxy.timeout: must be more than 0s (a header must arrive in bounded time), got 0",
        id="timeout-zero",
    ),
    pytest.param(
        "proxy:\n  timeout: soon\n",
        ":2: proxy.timeout: expected a duration such as 30s, 500ms, 2m or a number of seconds,"
        " got 'soon'",
        id="timeout-text",
    ),
    pytest.param(
        "proxy:\n  trustd: []\n",
        ":2: unknown option 'trustd' in proxy (did you mean 'trusted'?)",
        id="section-typo",
    ),
    pytest.param(
        "trusted: []\n",
        ":1: unknown option 'trusted' (did you mean 'proxy.trusted'?)",
        id="option-outside-its-section",
    ),
]


@pytest.mark.parametrize(("text", "expected"), ERRORS)
def test_error_messages(tmp_path: pathlib.Path, text: str, expected: str) -> None:
    """Each mistake fails with its exact message and line."""
    assert error(tmp_path, text) == expected


def test_render_round_trips(tmp_path: pathlib.Path) -> None:
    """--print-config writes mappings only where needed, and loads back to the same."""
    text = (
        'listen:\n  - "127.0.0.1:0"\n  - {address: "[::1]:0", proxy_protocol: true}\n'
        '  - {path: /run/e.sock, mode: "0660", proxy_protocol: true}\n'
        "proxy:\n  trusted: [10.1.0.0/16, 2001:db8::1]\n  timeout: 2.5s\n"
    )
    config = load(tmp_path, text)
    rendered = render_config(config)
    assert "- 127.0.0.1:0\n" in rendered
    assert "- address: '[::1]:0'\n  proxy_protocol: true\n" in rendered
    assert "  trusted:\n  - 10.1.0.0/16\n  - 2001:db8::1/128\n  timeout: 2.5s\n" in rendered
    (tmp_path / "again.yaml").write_text(rendered)
    again = load_config(str(tmp_path / "again.yaml"))
    assert (again.listen, again.proxy) == (config.listen, config.proxy)


def test_changes_and_describe_show_the_flag() -> None:
    """A listener gaining proxy_protocol, and new trusted networks, show up as changes."""
    old = Config()
    new = Config(
        listen=(ListenAddress("ipv4", host="127.0.0.1", port=7080, proxy_protocol=True),),
        proxy=ProxyConfig((ipaddress.ip_network("10.0.0.0/8"),), 3.0),
    )
    assert changes(old, new) == {
        "listen": (["127.0.0.1:7080", "[::1]:7080"], ["127.0.0.1:7080 proxy_protocol"]),
        "proxy.trusted": (["127.0.0.0/8", "::1/128"], ["10.0.0.0/8"]),
        "proxy.timeout": (5.0, 3.0),
    }
    assert describe(new).startswith("listeners: 127.0.0.1:7080 (PROXY);")


def test_proxy_protocol_on_udp_is_refused(tmp_path: pathlib.Path) -> None:
    """A PROXY header begins a TCP stream: a udp: listener cannot take one, and says so
    at the flag's line; a UDP mapping without the flag is fine."""
    text = (
        'listen:\n  - "127.0.0.1:7080"\n  - {address: "udp:127.0.0.1:7080", proxy_protocol: true}\n'
    )
    assert error(tmp_path, text) == (
        ":3: listen[1].proxy_protocol: PROXY headers begin TCP streams; 'udp:127.0.0.1:7080' is UDP"
    )
    config = load(tmp_path, 'listen: [{address: "udp:127.0.0.1:7080", proxy_protocol: false}]\n')
    assert config.listen[0].is_udp
