"""The packaged unit serving TLS on a real systemd 252 (issue 21): a key in /etc/ssl/private
readable only by root and the ssl-cert group, read by the dynamic user through the unit's
SupplementaryGroups=ssl-cert and read again at `systemctl reload`; and certificates handed
in with LoadCredential=, which systemd copies once, at start.

The package is installed with apt in one fresh container for the module (the ssl-cert
package comes in as its dependency); each test writes its own files and configuration and
restarts the service. The test's sockets live in the container's network namespace.
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from nspawn import Container, wait_until
from test_deb import GUEST_DEB_DIR, _install

from tests import tls_support as tls

pytestmark = pytest.mark.system

PORT = 7443
WAIT_S = 30.0
IO_TIMEOUT_S = 10.0
CERT = "/etc/ssl/certs/epolld-test.pem"
KEY = "/etc/ssl/private/epolld-test.key"
DROP_IN = "/etc/systemd/system/epolld.service.d/test.conf"
# As epolld.yaml(5) shows it. systemd 252 denies ExecReload= commands the credentials
# directory (only the main process reads it), so the reload is the signal alone: the
# daemon checks the file itself and keeps its old settings on a bad one.
CREDENTIALS_DROP_IN = """\
[Service]
LoadCredential=cert:/root/tls/cert.pem
LoadCredential=key:/root/tls/key.pem
ExecReload=
ExecReload=/bin/kill -HUP $MAINPID
"""


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> tuple[tls.Certs, tls.Pair]:
    """The test CA's certificates, and a second localhost certificate: the rotated one."""
    directory = tmp_path_factory.mktemp("tls-unit")
    certs = tls.make_certs(directory)
    return certs, tls._signed(directory, "rotated", "localhost", certs.ca)


@pytest.fixture(scope="module")
def installed(
    container_factory: Callable[..., Container], debs: dict[str, Path]
) -> Iterator[Container]:
    """A container with the package installed by apt, its service running."""
    c = container_factory()
    c.copy_in(debs["current"], f"{GUEST_DEB_DIR}/{debs['current'].name}", 0o644)
    _install(c, debs["current"])
    c.wait_for_state("epolld", ["active"], WAIT_S)
    with c.network():
        yield c


def _serial(pair: tls.Pair) -> str:
    """The certificate's serial number as getpeercert() spells it (upper-case hex)."""
    decoded = ssl._ssl._test_decode_cert(str(pair.certificate))  # type: ignore[attr-defined]
    return str(decoded["serialNumber"])


def _connect(certs: tls.Certs) -> ssl.SSLSocket:
    """A TLS connection to the service, verifying its certificate against the test CA."""
    context = tls.client_context(certs=certs)
    sock = socket.create_connection(("127.0.0.1", PORT), timeout=IO_TIMEOUT_S)
    return context.wrap_socket(sock, server_hostname="localhost")


def _served_serial(certs: tls.Certs) -> str | None:
    """The serial a new handshake sees, after one echo; None while nothing answers."""
    try:
        with _connect(certs) as c:
            assert tls.echo_python(c, b"serial?\n") == b"serial?\n"
            peer = c.getpeercert()
            return str(peer["serialNumber"]) if peer else None
    except OSError:
        return None


def _configure(c: Container, certificate: str, key: str) -> None:
    c.write_file(
        "/etc/epolld.yaml",
        f'listen:\n  - {{address: "127.0.0.1:{PORT}", tls: true}}\n'
        f'tls:\n  certificate: "{certificate}"\n  key: "{key}"\n'
        "logging:\n  connections: true\n",
    )


def _restart(c: Container) -> None:
    c.systemctl("daemon-reload")
    c.systemctl("restart", "epolld", check=False)
    c.wait_for_state("epolld", ["active", "failed"], WAIT_S)


def _journal_events(c: Container, event: str) -> list[dict[str, object]]:
    return c.journal("-u", "epolld", f"EPOLLD_EVENT={event}")


def test_ssl_cert_key_is_served_and_reload_loads_a_rotated_certificate(
    installed: Container, pairs: tuple[tls.Certs, tls.Pair]
) -> None:
    """A key of mode 0640 root:ssl-cert in /etc/ssl/private serves TLS (the dynamic user
    reads it through SupplementaryGroups=ssl-cert, and cannot without it); `systemctl reload`
    after rotating the files gives new handshakes the new certificate while an open TLS
    connection keeps echoing."""
    c = installed
    certs, rotated = pairs
    assert c.run("stat", "-c", "%a %U:%G", "/etc/ssl/private").stdout.split() == [
        "710",
        "root:ssl-cert",
    ], "the ssl-cert package's directory"
    c.copy_in(certs.server.certificate, CERT, 0o644)
    c.copy_in(certs.server.key, KEY, 0o640)
    c.run("chgrp", "ssl-cert", KEY)
    assert c.run("stat", "-c", "%a %U:%G", KEY).stdout.split() == ["640", "root:ssl-cert"]
    _configure(c, CERT, KEY)
    _restart(c)
    assert c.show("epolld", "ActiveState") == "active"
    assert wait_until(lambda: _served_serial(certs), WAIT_S, "TLS echo") == _serial(certs.server)

    with _connect(certs) as held:
        first = os.urandom(50_000)
        assert tls.echo_python(held, first) == first
        # Rotate in place (key first), as certbot's or an operator's deploy hook would.
        c.copy_in(rotated.key, KEY, 0o640)
        c.copy_in(rotated.certificate, CERT, 0o644)
        c.systemctl("reload", "epolld")
        wait_until(
            lambda: _served_serial(certs) == _serial(rotated) or None,
            WAIT_S,
            "a new handshake to see the rotated certificate",
        )
        second = os.urandom(50_000)
        assert tls.echo_python(held, second) == second, "the open connection kept echoing"
    assert c.show("epolld", "NRestarts") == "0"
    established = _journal_events(c, "tls_established")
    assert established, "tls_established in the journal"

    # Without the group the dynamic user cannot read the key: the start fails (78, EX_CONFIG).
    c.write_file(DROP_IN, "[Service]\nSupplementaryGroups=\n")
    try:
        _restart(c)
        assert c.show("epolld", "ActiveState") == "failed"
        assert c.show("epolld", "ExecMainStatus") == "78"
    finally:
        c.run("rm", "-f", DROP_IN)
        _restart(c)


def test_load_credential_serves_the_copy_until_a_restart(
    installed: Container, pairs: tuple[tls.Certs, tls.Pair]
) -> None:
    """certificate: credential:cert with LoadCredential=cert:/root/... in a drop-in serves
    the root-only files; a reload keeps the copy systemd made at start (the rotated source
    is not seen) and a restart picks the rotated files up."""
    c = installed
    certs, rotated = pairs
    c.copy_in(certs.server.certificate, "/root/tls/cert.pem", 0o600)
    c.copy_in(certs.server.key, "/root/tls/key.pem", 0o600)
    c.write_file(DROP_IN, CREDENTIALS_DROP_IN)
    try:
        _configure(c, "credential:cert", "credential:key")
        _restart(c)
        assert c.show("epolld", "ActiveState") == "active", c.run(
            "journalctl", "--no-pager", "-n", "20", "-u", "epolld"
        ).stdout
        served = wait_until(lambda: _served_serial(certs), WAIT_S, "TLS echo")
        assert served == _serial(certs.server)

        c.copy_in(rotated.certificate, "/root/tls/cert.pem", 0o600)
        c.copy_in(rotated.key, "/root/tls/key.pem", 0o600)
        reloads = len(_journal_events(c, "config_reloaded"))
        c.systemctl("reload", "epolld")
        wait_until(
            lambda: len(_journal_events(c, "config_reloaded")) > reloads or None,
            WAIT_S,
            "the reload to finish",
        )
        assert _served_serial(certs) == _serial(certs.server), "credentials copied once"

        _restart(c)
        assert c.show("epolld", "ActiveState") == "active"
        served = wait_until(lambda: _served_serial(certs), WAIT_S, "TLS echo after restart")
        assert served == _serial(rotated)
    finally:
        c.run("rm", "-f", DROP_IN)
