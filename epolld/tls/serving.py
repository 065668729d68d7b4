"""What the echo service needs to serve TLS listeners, in one object it creates lazily.

TlsServing holds a context per TLS listener (built by context.py from the file, rebuilt
at each reload), makes the TlsConnection for an accepted socket, counts and logs
handshakes (failures at a bounded rate), closes handshakes older than
tls.handshake_timeout, and, in the next process after a restart, finishes the TLS
connections the previous one could not hand over (ClosingSocket).

Importing it imports ssl: the service imports it only once a TLS listener is served.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from epolld.config import Config, ListenerTls, tls_of
from epolld.core.counters import Counters
from epolld.core.loop import CLOSE, Reactor
from epolld.observability import logsetup
from epolld.tcp.connection import SharedSettings
from epolld.tls import certs
from epolld.tls.connection import ClosingSocket, TlsConnection
from epolld.tls.context import build_contexts

if TYPE_CHECKING:
    from epolld.handoff import State
    from epolld.listening.sockets import Listener

log = structlog.get_logger("epolld")

FAILURE_WARNING_EVERY_S = 10.0  # per reason, one tls_handshake_failed warning at most
CLOSING_LINGER_S = 2.0  # after a restart: how long a TLS socket may wait for its peer's FIN
# At a restart, how long in all the old process may wait for TLS sockets to take their
# last echo and close_notify (OpenSSL holds what a full socket did not take, and it cannot
# travel): a client that stops reading then delays the new process's READY by this much.
HANDOFF_FLUSH_S = 0.3


class TlsServing:
    """The TLS side of one EchoService (one process or worker).

    Args:
        reactor: the service's reactor (for the handshake sweep and restored sockets).
        counters: the service's Counters (handshakes are counted there).
        config: the configuration in force.
    """

    def __init__(self, reactor: Reactor, counters: Counters, config: Config) -> None:
        self._reactor = reactor
        self._counters = counters
        self._config = config
        self._contexts: dict[ListenerTls, ssl.SSLContext] = {}
        self._by_name: dict[str, ssl.SSLContext] = {}  # listener name -> its context
        self._expiry: dict[str, float] = {}  # certificate file -> notAfter
        self._handshaking: dict[TlsConnection, None] = {}  # in accept order
        self._sweep_armed = False
        self._warned_at: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}
        self._closing: dict[ClosingSocket, None] = {}
        self._handoff_deadline: float | None = None
        self.closed_at_handoff = 0
        self._log: Callable[..., Any] | None = None
        self.configure(config)

    # -- configuration ---------------------------------------------------------------

    def prepare(self, config: Config) -> dict[ListenerTls, ssl.SSLContext]:
        """Build a context for every TLS listener of config, reading every file again.

        Raises:
            ConfigError: a file cannot be used (the message names it); nothing changed.
        """
        wanted = {tls_of(config, a) for a in config.listen if a.tls}
        return build_contexts({t for t in wanted if t is not None})

    def configure(
        self, config: Config, contexts: dict[ListenerTls, ssl.SSLContext] | None = None
    ) -> None:
        """Use config from now on (contexts: from prepare(), else built here): new
        handshakes get the new certificates; open connections keep theirs."""
        self._config = config
        self._contexts = self.prepare(config) if contexts is None else contexts
        if config.logging.connections:
            self._log = log.info
        elif logsetup.enabled("debug"):
            self._log = log.debug
        else:
            self._log = None
        self._by_name.clear()
        self._warn_of_dates()

    def listen(self, listener: Listener) -> None:
        """Serve listener with the context its address calls for."""
        if listener.address is None:
            return
        settings = tls_of(self._config, listener.address)
        if settings is None:
            return
        context = self._contexts.get(settings)
        if context is None:  # a listener the last prepare() did not know
            context = self._contexts[settings] = build_contexts({settings})[settings]
        self._by_name[listener.name] = context

    def refresh(self, listeners: list[Listener]) -> None:
        """After a reload: every TLS listener gets the context of its current address."""
        self._by_name.clear()
        for listener in listeners:
            if listener.tls:
                self.listen(listener)

    def context_for(self, listener_name: str) -> ssl.SSLContext | None:
        return self._by_name.get(listener_name)

    def _warn_of_dates(self) -> None:
        """Certificates outside their dates are served (clients are tested against such
        on purpose), with a warning at start and at each reload."""
        files = {t.certificate for t in self._contexts} | {
            e.certificate for t in self._contexts for e in t.sni
        }
        self._expiry = {}
        for path in sorted(files):
            try:
                not_before, not_after = certs.validity(path)
            except (OSError, ValueError, ssl.SSLError):
                continue
            self._expiry[path] = not_after
            problem = certs.expiry_problem(path)
            if problem is not None:
                log.warning(
                    "tls_certificate_not_valid",
                    certificate=path,
                    problem=problem,
                    not_before=_iso(not_before),
                    not_after=_iso(not_after),
                    action="served anyway",
                )

    def certificates(self) -> dict[str, float]:
        """Certificate file -> notAfter (Unix time), for epolld_tls_certificate_expiry_seconds."""
        return dict(self._expiry)

    # -- connections -------------------------------------------------------------------

    def open(
        self,
        context: ssl.SSLContext,
        sock: socket.socket,
        ip: str,
        *,
        buf: memoryview,
        shared: SharedSettings,
        now: float,
        peer: str | None,
        edge: bool,
        cls: type[TlsConnection] = TlsConnection,
    ) -> TlsConnection:
        """A TlsConnection (cls: a service's, services/tls.py) for an accepted socket; its
        handshake is timed from now."""
        conn = cls(
            sock,
            ip,
            buf=buf,
            shared=shared,
            now=now,
            peer=peer,
            context=context,
            owner=self,
            edge=edge,
        )
        self._handshaking[conn] = None
        if not self._sweep_armed:
            self._arm_sweep()
        return conn

    def _arm_sweep(self) -> None:
        self._sweep_armed = True
        timeout_s = self._config.tls.handshake_timeout_s
        self._reactor.call_later(min(1.0, timeout_s / 5), self._sweep)

    def _sweep(self) -> None:
        """Close the handshakes older than tls.handshake_timeout: they are kept in accept
        order, so the sweep stops at the first one still in time."""
        self._sweep_armed = False
        timeout_s = self._config.tls.handshake_timeout_s
        deadline = self._reactor.now - timeout_s
        expired = []
        for conn in self._handshaking:
            if conn.opened_at > deadline:
                break
            expired.append(conn)
        for conn in expired:
            conn._failed("timeout", f"no complete handshake within {timeout_s}s")
            if conn.sock.fileno() >= 0:
                self._reactor.close(conn)
        if self._handshaking:
            self._arm_sweep()

    def handshake_done(self, conn: TlsConnection) -> None:
        self._handshaking.pop(conn, None)
        self._counters.count_handshake(None, self._reactor.now - conn.opened_at)
        if self._log is not None:
            tls = conn.tls
            cipher = tls.cipher()
            fields: dict[str, Any] = {
                "peer": conn.peer,
                "fd": conn.fd,
                "version": tls.version(),
                "cipher": cipher[0] if cipher else None,
                "sni": conn.sni,
            }
            if tls.context.verify_mode == ssl.CERT_REQUIRED:
                fields["client_subject"] = _subject(tls.getpeercert())
            self._log("tls_established", **fields)

    def handshake_failed(self, conn: TlsConnection, reason: str, detail: str) -> None:
        """Count a failed handshake; warn per reason at most every FAILURE_WARNING_EVERY_S."""
        if self._handshaking.pop(conn, False) is False:
            return  # counted already (a sweep after a failure in the same turn)
        self._counters.count_handshake(reason)
        now = self._reactor.now
        self._unlogged[reason] = self._unlogged.get(reason, 0) + 1
        if now - self._warned_at.get(reason, -FAILURE_WARNING_EVERY_S) >= FAILURE_WARNING_EVERY_S:
            log.warning(
                "tls_handshake_failed",
                reason=reason,
                detail=detail,
                peer=conn.peer,
                failed=self._unlogged[reason],
            )
            self._warned_at[reason] = now
            self._unlogged[reason] = 0

    def handoff_flush_left(self) -> float:
        """Seconds left of HANDOFF_FLUSH_S, counted from the first TLS connection to ask."""
        now = time.monotonic()
        if self._handoff_deadline is None:
            self._handoff_deadline = now + HANDOFF_FLUSH_S
        return max(0.0, self._handoff_deadline - now)

    def tls_closed(self, conn: TlsConnection) -> None:
        self._handshaking.pop(conn, None)
        if conn.reason == "truncated" and self._log is not None:
            self._log("tls_truncated", peer=conn.peer, fd=conn.fd, bytes_in=conn.bytes_in)

    # -- after a restart: the sockets of TLS connections the previous process closed ----

    def restore_closing(self, record: dict[str, Any], state: State) -> None:
        """Send what the previous process left for a TLS connection (its echo, then
        close_notify), FIN, and close once the peer closes or CLOSING_LINGER_S passed."""
        sock = socket.socket(fileno=state.take_fd(record["fd"]))
        sock.setblocking(False)
        pending = state.data(record["out"]) if record.get("out") is not None else b""
        closing = ClosingSocket(
            sock,
            bytes(pending),
            shut=bool(record.get("shut")),
            edge=bool(record.get("edge")),
            done=self._closing_done,
        )
        self.closed_at_handoff += 1
        self._counters.count_close(
            "tls_restart",
            max(0.0, self._reactor.now - float(record.get("opened_at", self._reactor.now))),
            int(record.get("bytes_in", 0)),
            int(record.get("bytes_out", 0)),
        )
        if self._log is not None:
            self._log(
                "connection_closed",
                peer=record.get("peer"),
                fd=closing.fd,
                bytes_in=record.get("bytes_in", 0),
                bytes_out=record.get("bytes_out", 0),
                reason="tls_restart",
            )
        mask = closing.start()
        if mask == CLOSE:
            closing.close()
            return
        closing.mask = mask
        self._closing[closing] = None
        self._reactor.add(closing)
        self._reactor.call_later(CLOSING_LINGER_S, lambda: self._expire_closing(closing))

    def _expire_closing(self, closing: ClosingSocket) -> None:
        if closing in self._closing:
            self._reactor.close(closing)

    def _closing_done(self, closing: ClosingSocket) -> None:
        self._closing.pop(closing, None)


def _iso(seconds: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat()


# getpeercert() spells attribute names out; logs use the short forms of RFC 4514.
_SHORT = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "stateOrProvinceName": "ST",
    "localityName": "L",
    "domainComponent": "DC",
}


def _subject(cert: dict[str, Any] | None) -> str | None:
    """ "CN=client,O=Example" from getpeercert()'s nested tuples."""
    if not cert:
        return None
    parts = [f"{_SHORT.get(k, k)}={v}" for rdn in cert.get("subject", ()) for k, v in rdn]
    return ",".join(parts) or None
