"""The Debian package on a real systemd 252: install, reload, journal, upgrade, remove, purge, man.

The .deb is built once per session with packaging/dev/build-deb (dpkg-buildpackage and lintian,
as `make deb` does); the upgrade uses a copy repacked with a higher version. Each test boots a
fresh container from the cached Debian 12 root file system (see nspawn.py) and installs the
package with apt, as an operator would, so no test depends on another's leftovers.

The shipped /etc/epolld.yaml listens on 127.0.0.1:7080 and [::1]:7080. Each container has a
network namespace of its own, and the test's sockets are created in it (the container fixture
enters it): the installed service is shown serving exactly its default addresses, and nothing
on the host's 7080 (another epolld, another test run) can collide with it. apt-get alone uses
the host's network, to reach the package mirror.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import UPGRADE_VERSION
from nspawn import Container, ContainerError, wait_until

from tests.traffic import echo_until_eof

pytestmark = pytest.mark.system

DEFAULT_ADDRESSES = [("127.0.0.1", 7080, socket.AF_INET), ("::1", 7080, socket.AF_INET6)]
# The operator's edited config moves the service to an address of its own.
EDITED_HOST = "127.0.0.2"
EDITED_PORT = 7083
GUEST_DEB_DIR = "/tmp/debs"
WAIT_S = 30.0  # for anything systemd, dpkg or the daemon does in response to a command
IO_TIMEOUT_S = 10.0
APT_TIMEOUT_S = 300.0  # apt-get update plus man-db's download, on a slow mirror

EDITED_CONFIG = f"""\
# Edited by the operator: a listener of its own, and a shorter idle timeout.
listen:
  - "{EDITED_HOST}:{EDITED_PORT}"
limits:
  idle_timeout: 42s
"""


@pytest.fixture
def container(
    container_factory: Callable[..., Container], debs: dict[str, Path]
) -> Iterator[Container]:
    """A freshly booted Debian 12 with both .deb files copied in; powered off after the test.

    The test runs inside the container's network namespace: its sockets reach the container's
    loopback, not the host's.
    """
    c = container_factory()
    for deb in debs.values():
        c.copy_in(deb, f"{GUEST_DEB_DIR}/{deb.name}", 0o644)
    with c.network():
        yield c
    c.stop()


def _apt(c: Container, *args: str) -> str:
    """Run apt-get non-interactively in the container; return its output."""
    result = c.run(
        "env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "-y", "-q", *args,
        timeout=APT_TIMEOUT_S, host_network=True,  # the container's own network is loopback only
    )  # fmt: skip
    return result.stdout


def _install(c: Container, deb: Path) -> None:
    """apt-get install ./epolld_VERSION_all.deb, as the README tells operators (after an
    apt-get update the first time: the cached root file system keeps no package lists, and
    the package depends on ssl-cert, which comes from the mirror)."""
    if c.sh("ls /var/lib/apt/lists/*_Packages", check=False).returncode != 0:
        _apt(c, "update")
    _apt(c, "install", f"{GUEST_DEB_DIR}/{deb.name}")


def _echo(host: str, port: int, payload: bytes) -> bytes:
    return echo_until_eof(port, payload, host=host, timeout=IO_TIMEOUT_S)


def _echoes(host: str, port: int) -> bool:
    """Whether host:port accepts a connection and echoes a probe intact."""
    try:
        return _echo(host, port, b"probe\n") == b"probe\n"
    except OSError:
        return False


def _refuses(host: str, port: int, family: socket.AddressFamily = socket.AF_INET) -> bool:
    """Whether a connection to host:port is refused (nothing listens there)."""
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(IO_TIMEOUT_S)
        return s.connect_ex((host, port)) != 0


def _main_pid(c: Container) -> int:
    return int(c.show("epolld", "MainPID"))


def _dpkg_status(c: Container) -> str:
    """dpkg's status of epolld, e.g. "install ok installed" or "deinstall ok config-files"."""
    result = c.run("dpkg-query", "-W", "-f=${Status}", "epolld", check=False)
    return result.stdout.strip() if result.returncode == 0 else "not known"


def _edit_config_and_reload(c: Container) -> None:
    """Edit /etc/epolld.yaml as an operator would, reload, and wait for the new listener."""
    c.write_file("/etc/epolld.yaml", EDITED_CONFIG)
    c.systemctl("reload", "epolld")
    # systemctl reload returns once ExecReload has run, before the daemon has re-bound.
    wait_until(lambda: _echoes(EDITED_HOST, EDITED_PORT), WAIT_S, "the edited listener to echo")


def test_install_enables_starts_and_echoes(container: Container, debs: dict[str, Path]) -> None:
    """apt-get install leaves epolld.service enabled, active, and echoing on both defaults."""
    _install(container, debs["current"])
    assert container.systemctl("is-enabled", "epolld.service").stdout.strip() == "enabled"
    assert container.wait_for_state("epolld", ["active", "failed"], WAIT_S) == "active"
    for host, port, _family in DEFAULT_ADDRESSES:
        payload = f"hello {host}\n".encode() * 1000
        assert _echo(host, port, payload) == payload
    # Installed but left off: enabled, it would hold the very addresses the service binds.
    socket_enabled = container.systemctl("is-enabled", "epolld.socket", check=False).stdout
    assert socket_enabled.strip() == "disabled"
    assert container.show("epolld.socket", "ActiveState") == "inactive"
    # The daemon runs as a dynamic user, not root.
    assert container.show("epolld", "DynamicUser") == "yes"
    user = container.run("ps", "-o", "user=", "-p", str(_main_pid(container))).stdout.strip()
    assert user not in ("root", "0")


def test_reload_applies_edited_config(container: Container, debs: dict[str, Path]) -> None:
    """After editing /etc/epolld.yaml, `systemctl reload epolld` serves the new address in place."""
    _install(container, debs["current"])
    container.wait_for_state("epolld", ["active"], WAIT_S)
    pid = _main_pid(container)
    _edit_config_and_reload(container)
    assert _main_pid(container) == pid
    wait_until(lambda: _refuses("127.0.0.1", 7080), WAIT_S, "the old default listener to close")
    assert container.show("epolld", "ActiveState") == "active"


def test_journal_shows_service_logs(container: Container, debs: dict[str, Path]) -> None:
    """`journalctl -u epolld` holds the daemon's entries under its own identifier, each
    with its fields (EPOLLD_EVENT, EPOLLD_ADDRESS)."""
    _install(container, debs["current"])
    container.wait_for_state("epolld", ["active"], WAIT_S)

    def listening_entries() -> list[str] | None:
        entries = container.journal(
            "-u", "epolld", "SYSLOG_IDENTIFIER=epolld", "EPOLLD_EVENT=listening"
        )
        found = [str(e.get("EPOLLD_ADDRESS")) for e in entries]
        return found if len(found) >= 2 else None

    addresses = wait_until(listening_entries, WAIT_S, "two 'listening' entries in the journal")
    assert "127.0.0.1:7080" in addresses
    assert "[::1]:7080" in addresses
    text = container.run("journalctl", "--no-pager", "-u", "epolld").stdout
    assert "epolld[" in text


def test_upgrade_keeps_edited_config_and_restarts(
    container: Container, debs: dict[str, Path]
) -> None:
    """Installing a newer version keeps the operator's /etc/epolld.yaml and restarts the service."""
    _install(container, debs["current"])
    container.wait_for_state("epolld", ["active"], WAIT_S)
    _edit_config_and_reload(container)
    old_pid = _main_pid(container)

    _install(container, debs["newer"])

    version = container.run("dpkg-query", "-W", "-f=${Version}", "epolld").stdout
    assert version == UPGRADE_VERSION
    assert container.read_file("/etc/epolld.yaml") == EDITED_CONFIG
    assert not container.run("sh", "-c", "ls /etc/epolld.yaml.dpkg-*", check=False).stdout
    assert container.wait_for_state("epolld", ["active", "failed"], WAIT_S) == "active"
    new_pid = _main_pid(container)
    assert new_pid not in (0, old_pid)
    # The restarted daemon read the edited file, not the package's default.
    wait_until(lambda: _echoes(EDITED_HOST, EDITED_PORT), WAIT_S, "the upgraded daemon to echo")
    assert _refuses("127.0.0.1", 7080)


def test_remove_stops_service_and_keeps_config(container: Container, debs: dict[str, Path]) -> None:
    """`apt-get remove` stops the service and leaves the operator's edited conffile in place."""
    _install(container, debs["current"])
    container.wait_for_state("epolld", ["active"], WAIT_S)
    _edit_config_and_reload(container)

    _apt(container, "remove", "epolld")

    assert _dpkg_status(container) == "deinstall ok config-files"
    assert container.read_file("/etc/epolld.yaml") == EDITED_CONFIG
    assert container.show("epolld", "ActiveState") == "inactive"  # a clean stop, not a failure
    assert _refuses(EDITED_HOST, EDITED_PORT)
    assert container.run("test", "-e", "/usr/bin/epolld", check=False).returncode != 0


def test_purge_removes_config(container: Container, debs: dict[str, Path]) -> None:
    """`apt-get purge` stops the service and removes /etc/epolld.yaml and the enablement links."""
    _install(container, debs["current"])
    container.wait_for_state("epolld", ["active"], WAIT_S)

    _apt(container, "purge", "epolld")

    assert _dpkg_status(container) == "not known"
    for leftover in (
        "/etc/epolld.yaml",
        "/etc/systemd/system/multi-user.target.wants/epolld.service",
        "/lib/systemd/system/epolld.service",
    ):
        assert container.run("test", "-e", leftover, check=False).returncode != 0, leftover
    assert container.show("epolld", "ActiveState") == "inactive"
    for host, port, family in DEFAULT_ADDRESSES:
        assert _refuses(host, port, family)


def test_man_pages_after_install(container: Container, debs: dict[str, Path]) -> None:
    """`man epolld`, `man epolld.yaml` and `man epolld-client` show the installed pages."""
    if container.run("sh", "-c", "command -v man", check=False).returncode != 0:
        _apt(container, "update")  # the cached root file system keeps no package lists
        _apt(container, "install", "--no-install-recommends", "man-db")
    _install(container, debs["current"])
    pages = {
        ("8", "epolld"): "RFC 862 echo daemon on epoll",
        ("5", "epolld.yaml"): "configuration file of the epolld echo daemon",
        ("1", "epolld-client"): "talk to an echo server",
    }
    for (section, page), summary in pages.items():
        try:
            result = container.run("env", "MANPAGER=cat", "MANWIDTH=100", "man", section, page)
        except ContainerError as e:
            pytest.fail(f"man {section} {page} failed: {e}")
        assert summary in result.stdout.replace("\u2010", "-"), result.stdout[:500]


def test_socket_activation_survives_upgrade_and_stops_on_remove(
    container: Container, debs: dict[str, Path]
) -> None:
    """With epolld.socket chosen, an upgrade keeps it and restarts epolld; remove stops it."""
    _install(container, debs["current"])
    container.wait_for_state("epolld", ["active"], WAIT_S)
    container.systemctl("disable", "--now", "epolld.service")
    container.systemctl("enable", "--now", "epolld.socket")
    assert container.show("epolld", "ActiveState") == "inactive"
    assert _echo("127.0.0.1", 7080, b"first\n") == b"first\n"  # starts it
    container.wait_for_state("epolld", ["active"], WAIT_S)
    old_pid = _main_pid(container)

    _install(container, debs["newer"])

    assert container.systemctl("is-enabled", "epolld.socket").stdout.strip() == "enabled"
    assert container.show("epolld.socket", "ActiveState") == "active"
    assert container.systemctl("is-enabled", "epolld.service", check=False).stdout.strip() == (
        "disabled"
    )
    assert _echo("127.0.0.1", 7080, b"second\n") == b"second\n"
    # The daemon that serves is a new one, running the upgraded code.
    assert _main_pid(container) not in (0, old_pid)

    _apt(container, "remove", "epolld")

    assert container.show("epolld.socket", "ActiveState") == "inactive"
    assert container.show("epolld", "ActiveState") == "inactive"
    for host, port, family in DEFAULT_ADDRESSES:
        assert _refuses(host, port, family)
