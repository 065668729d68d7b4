"""An ssl.SSLContext per TLS listener: its certificate, key, client CA, minimum version
and SNI certificates, read from the files each time (at start and at every reload).

Renegotiation is refused: OpenSSL 3.0 refuses a client's by default, and
OP_NO_RENEGOTIATION makes sure that no build of the library turns it back on.

The client's order of cipher suites wins, as in Mozilla's intermediate profile
(ssl_prefer_server_ciphers off): every suite offered is strong, and the client knows
whether its CPU has AES instructions. Python sets OP_CIPHER_SERVER_PREFERENCE, which with
OpenSSL's TLS 1.3 order gave every client AES-256-GCM; Go, browsers and curl on AES
hardware now get the AES-128-GCM they ask for first, as from a Go server.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterable
from typing import Any

from epolld.config import ListenerTls
from epolld.errors import ConfigError
from epolld.tls import certs

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def build_contexts(settings: Iterable[ListenerTls]) -> dict[ListenerTls, ssl.SSLContext]:
    """A context for each listener setting (SNI contexts attached).

    Raises:
        ConfigError: a file cannot be used now; the message names it.
    """
    return {s: build_context(s) for s in settings}


def build_context(settings: ListenerTls) -> ssl.SSLContext:
    """The context of one TLS listener; an SNI callback switches to an entry's context.

    Raises:
        ConfigError: a file cannot be used now; the message names it.
    """
    default = _context(settings, settings.certificate, settings.key)
    if settings.sni:
        exact: dict[str, ssl.SSLContext] = {}
        wildcard: dict[str, ssl.SSLContext] = {}
        for entry in settings.sni:
            context = _context(settings, entry.certificate, entry.key)
            for name in entry.names:
                if name.startswith("*."):
                    wildcard[name[2:]] = context
                else:
                    exact[name] = context
        default.sni_callback = _chooser(exact, wildcard)
    return default


# The callback's first argument is the TlsConnection (the owner of its TLS session):
# its `sni` is logged, and setting its `context` switches the session's.
SniCallback = Callable[[Any, "str | None", ssl.SSLContext], None]


def _chooser(exact: dict[str, ssl.SSLContext], wildcard: dict[str, ssl.SSLContext]) -> SniCallback:
    def choose(conn: Any, server_name: str | None, _current: ssl.SSLContext) -> None:
        """Pick the entry whose names match server_name; none matching keeps the default."""
        if server_name is None:
            return
        name = server_name.lower()
        conn.sni = name  # for the connection log
        context = exact.get(name)
        if context is None:
            _, _, parent = name.partition(".")
            context = wildcard.get(parent)  # "*.b.example" covers one label only
        if context is not None:
            conn.context = context

    return choose


def _context(settings: ListenerTls, certificate: str, key: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS[settings.min_version]
    context.options |= ssl.OP_NO_RENEGOTIATION
    context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    for check in (certs.check_certificate(certificate), certs.check_key(key)):
        if check is not None:
            raise ConfigError(f"tls: {check}")
    try:
        certs.load_pair(context, certificate, key)
    except (ssl.SSLError, OSError):
        raise ConfigError(f"tls: {certs.check_pair(certificate, key) or key}") from None
    if settings.client_ca is not None:
        try:
            context.load_verify_locations(cafile=settings.client_ca)
        except (ssl.SSLError, OSError) as e:
            raise ConfigError(f"tls: {settings.client_ca}: cannot be loaded ({e})") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context
