"""discard, chargen and info over TLS (imported only when such a listener is served).

Each is a TlsConnection (tls/connection.py) whose handshake, backpressure, close_notify
and lingering are the echo's; what differs is what it does with the plaintext once
the handshake is done (`_serve`): discard drops it, chargen drops it and writes the
pattern (ciphertext kept below high_water: the pattern is written only while less
waits), info writes its line with the session's version, cipher, SNI and the client
certificate's subject, then close_notify and FIN.

A TLS session cannot travel through a restart handoff: as for TLS echo, what is queued
is sent and closed by the next process (tls_closing records).
"""

from __future__ import annotations

import socket
import ssl
from typing import Any, ClassVar, Final

from epolld.core.loop import CLOSE
from epolld.services import info
from epolld.services.stream import CYCLE_BYTES, WINDOW
from epolld.tcp.connection import EPOLLOUT, SharedSettings
from epolld.tls.connection import (
    ECHO,
    HANDSHAKE,
    RECORD_BYTES,
    TlsConnection,
    failure_reason,
)
from epolld.tls.serving import TlsServing

GENERATE_ROUNDS: Final = 4  # chargen: write-and-send rounds per event before yielding


class TlsService(TlsConnection):
    """The handshake as TLS echo's; then the service instead of the echo."""

    __slots__ = ("about",)
    SERVICE: ClassVar[str]
    about: tuple[str, Any]  # the listener's name, the PROXY header (None without)

    def _progress(self) -> int:
        if self.phase == HANDSHAKE:
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                if self.eof:
                    return self._failed("eof", "the peer closed during the handshake")
                self._collect()
                return self._send_and_wait()
            except ssl.SSLError as e:
                self._collect()
                self._send_once()
                return self._failed(failure_reason(e), str(e.reason or e))
            self.phase = ECHO
            self.tls_owner.handshake_done(self)
            self._started()
        if self.phase == ECHO:
            if not self._drop_records():
                return CLOSE
            self._collect()
        return self._send_and_wait()

    def _started(self) -> None:
        """Right after the handshake (info writes its line here)."""

    def _drop_records(self) -> bool:
        """Read and drop the plaintext received; False on a TLS error (reason set)."""
        tls, inbio = self.tls, self.inbio
        while self.phase == ECHO and (inbio.pending or tls.pending() or self.eof):
            try:
                data = tls.read(RECORD_BYTES)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                data = b""
            except ssl.SSLEOFError:  # a FIN without close_notify
                self.reason = "truncated"
                break
            except ssl.SSLError as e:
                self.reason = "error"
                self.error = f"tls: {e.reason or e}"
                return False
            if not data:  # the client's close_notify
                self.reason = self.reason or "eof"
                self._close_notify()
                break
            self.bytes_in += len(data)
        return True

    def _progress_no_send(self) -> None:
        """A stop or a handoff: drop what arrived (never echo it)."""
        self._drop_records()
        self._collect()


class TlsDiscard(TlsService):
    __slots__ = ()
    SERVICE = "discard"


class TlsChargen(TlsService):
    """The pattern in records while less than low_water of ciphertext waits; the
    client's FIN without close_notify ends it as for echo (a TLS stream is over)."""

    __slots__ = ()
    SERVICE = "chargen"

    def _send_and_wait(self) -> int:
        if self.phase == ECHO and not self.eof:
            for _ in range(GENERATE_ROUNDS):
                self._generate()
                if not self._flush():
                    return CLOSE
                if self.out:
                    break  # the socket is full: EPOLLOUT says when to go on
            else:
                self.shared.reschedule((self.fd, EPOLLOUT))
        return super()._send_and_wait()

    def _generate(self) -> None:
        low = self.shared.low_water
        while len(self.out) <= low:
            start = self.echoed % CYCLE_BYTES
            self.tls.write(WINDOW[start : start + RECORD_BYTES])
            self.echoed += RECORD_BYTES
            self._collect()


class TlsInfo(TlsService):
    __slots__ = ()
    SERVICE = "info"

    def _started(self) -> None:
        listener, header = self.about
        try:
            fields = info.tcp_fields(self.sock, listener, header)
        except OSError:
            return
        fields["tls"] = tls_fields(self.tls)
        line = info.line(fields)
        self.tls.write(line)
        self.echoed += len(line)
        self._close_notify()


def tls_fields(tls: ssl.SSLObject) -> dict[str, Any]:
    """The session as info reports it."""
    cipher = tls.cipher()
    subject = None
    cert = tls.getpeercert()
    if cert:
        rdns: Any = cert.get("subject", ())  # ((("commonName", "x"),), ...)
        subject = ",".join(f"{key}={value}" for rdn in rdns for key, value in rdn)
    return {
        "version": tls.version(),
        "cipher": cipher[0] if cipher else None,
        "sni": getattr(tls, "epolld_sni", None),
        "client_subject": subject,
    }


_CLASSES: Final[dict[str, type[TlsService]]] = {
    "discard": TlsDiscard,
    "chargen": TlsChargen,
    "info": TlsInfo,
}


def _record_sni(sslobj: ssl.SSLObject, name: str | None, context: ssl.SSLContext) -> None:
    sslobj.epolld_sni = name  # type: ignore[attr-defined]  # read by tls_fields()


def open_tls_service(
    serving: TlsServing,
    service: str,
    context: ssl.SSLContext,
    sock: socket.socket,
    ip: str,
    *,
    buf: memoryview,
    shared: SharedSettings,
    now: float,
    peer: str | None,
    edge: bool,
    listener: str,
    header: Any,
) -> TlsConnection:
    """The TLS connection of a service listener's client."""
    if service == "info" and context.sni_callback is None:
        # Without SNI entries nothing records the name the client asked for.
        context.sni_callback = _record_sni
    conn = serving.open(
        context, sock, ip, buf=buf, shared=shared, now=now, peer=peer, edge=edge,
        cls=_CLASSES[service],
    )  # fmt: skip
    assert isinstance(conn, TlsService)
    conn.about = (listener, header)
    return conn
