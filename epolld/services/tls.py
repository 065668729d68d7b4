"""discard, chargen and info over TLS (imported only when such a listener is served).

Each is a TlsConnection (tls/connection.py) whose handshake, backpressure, close_notify,
stop, restart and lingering are the echo's; what differs is what it does with the
plaintext once the handshake is done: discard drops it; chargen drops it and writes the
pattern, a record at a time, while the socket takes it (a record OpenSSL could not send
waits in `out`, and nothing more is generated until it has gone: nothing is buffered past
one record); info writes its line with the session's version, cipher, SNI and the client
certificate's subject, then close_notify and FIN.

A TLS session cannot travel through a restart handoff: as for TLS echo, what is queued
is sent with close_notify and the socket closed by the next process (tls_closing records).
"""

from __future__ import annotations

import socket
import ssl
from typing import Any, ClassVar, Final

from epolld.core.loop import CLOSE
from epolld.services import info
from epolld.services.stream import CYCLE_BYTES, WINDOW
from epolld.tcp.connection import EPOLLIN, EPOLLOUT, EPOLLRDHUP, SharedSettings
from epolld.tls.connection import CLOSING, ECHO, RECORD_BYTES, TlsConnection, receive_queued
from epolld.tls.serving import TlsServing

GENERATE_RECORDS: Final = 8  # chargen: records written per event before yielding the loop


def drop_records(conn: TlsConnection, ev: int, budget: int) -> bool:
    """Decrypt and drop the records received (at most budget of them, as the echo reads
    them); False: close now. A service's _read (faults/tls_services.py's too)."""
    tls, buf = conn.tls, conn.buf
    size = len(buf)
    while True:
        try:
            n = tls.read(size, buf)
        except ssl.SSLWantReadError:
            return True
        except ssl.SSLEOFError:  # a FIN without close_notify: the stream is over
            conn.reason = "truncated"
            conn.eof = True
            conn.reading = False
            return True
        except ssl.SSLWantWriteError:  # as in TlsConnection._read
            conn.shared.reschedule((conn.fd, EPOLLIN))
            return True
        except ssl.SSLError as e:
            conn.reason = "error"
            conn.error = f"tls: {e.reason or e}"
            return False
        except OSError as e:
            conn._fail(e)
            return False
        if not n:  # the client's close_notify: ours follows once what waits is sent
            conn.reason = conn.reason or "eof"
            conn.phase = CLOSING
            conn.reading = False
            return True
        conn.bytes_in += n
        if n == size and tls.pending():
            continue
        budget -= 1
        if not budget or (not ev & EPOLLRDHUP and not receive_queued(conn.fd)):
            if not budget and conn.edge_mode:
                conn.shared.reschedule((conn.fd, ev & (EPOLLIN | EPOLLRDHUP) or EPOLLIN))
            return True


class TlsService(TlsConnection):
    """The handshake as TLS echo's; then the service instead of the echo. bytes_in counts
    the plaintext received (and dropped), bytes_out what the service sent."""

    __slots__ = ("about", "sent")
    SERVICE: ClassVar[str]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent = 0
        self.about: tuple[str, Any] = ("", None)  # the listener's name, the PROXY header

    @property
    def bytes_out(self) -> int:
        return self.sent

    def _read(self, ev: int, budget: int) -> bool:
        return drop_records(self, ev, budget)

    def _send(self, data: bytes | memoryview) -> bool:
        """Hand data to OpenSSL; what the socket does not take waits in `out` (written
        before anything else). False: the connection failed."""
        try:
            self.tls.write(data)
        except ssl.SSLWantWriteError:
            self.out = bytes(data)  # a retry must start with the same bytes
        except (ssl.SSLError, OSError) as e:
            self.reason = "error"
            self.error = f"tls: {e}"
            return False
        self.sent += len(data)
        return True


class TlsDiscard(TlsService):
    __slots__ = ()
    SERVICE = "discard"


class TlsChargen(TlsService):
    """The pattern in records while the socket takes them."""

    __slots__ = ()
    SERVICE = "chargen"

    def _established(self) -> None:
        self.shared.reschedule((self.fd, EPOLLOUT))  # start without waiting for the client

    def on_event(self, ev: int) -> int:
        mask = super().on_event(ev)
        if mask == CLOSE or self.phase != ECHO or self.eof or self.out:
            return mask
        for _ in range(GENERATE_RECORDS):
            start = self.sent % CYCLE_BYTES
            if not self._send(WINDOW[start : start + RECORD_BYTES]):
                return CLOSE
            if self.out:  # the socket is full: EPOLLOUT says when to go on
                return self._wait()
        self.shared.reschedule((self.fd, EPOLLOUT))  # more next turn, after the others
        return mask


class TlsInfo(TlsService):
    __slots__ = ()
    SERVICE = "info"

    def _established(self) -> None:
        line = info_line(self, self.about)
        if line is not None and self._send(line):
            self.phase = CLOSING  # then close_notify, FIN, and linger until the client's FIN
            self.reading = False


def info_line(conn: TlsConnection, about: tuple[str, Any]) -> bytes | None:
    """info's line for a TLS client (None: the client has gone)."""
    listener, header = about
    try:
        fields = info.tcp_fields(conn.sock, listener, header)
    except OSError:
        return None
    fields["tls"] = tls_fields(conn)
    return info.line(fields)


def tls_fields(conn: TlsConnection) -> dict[str, Any]:
    """The session as info reports it."""
    tls = conn.tls
    cipher = tls.cipher()
    subject = None
    cert = tls.getpeercert()
    if cert:
        rdns: Any = cert.get("subject", ())  # ((("commonName", "x"),), ...)
        subject = ",".join(f"{key}={value}" for rdn in rdns for key, value in rdn)
    return {
        "version": tls.version(),
        "cipher": cipher[0] if cipher else None,
        "sni": conn.sni,
        "client_subject": subject,
    }


_CLASSES: Final[dict[str, type[TlsService]]] = {
    "discard": TlsDiscard,
    "chargen": TlsChargen,
    "info": TlsInfo,
}


def _record_sni(conn: Any, name: str | None, context: ssl.SSLContext) -> None:
    conn.sni = name.lower() if name else None  # read by tls_fields()


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
    cls: type[TlsConnection] | None = None,
) -> TlsConnection:
    """The TLS connection of a service listener's client (of cls: a fault listener's)."""
    if service == "info" and context.sni_callback is None:
        # Without SNI entries nothing records the name the client asked for.
        context.sni_callback = _record_sni
    conn: Any = serving.open(
        context, sock, ip, buf=buf, shared=shared, now=now, peer=peer, edge=edge,
        cls=cls or _CLASSES[service],
    )  # fmt: skip
    conn.about = (listener, header)  # every service class has it (faults/tls_services.py's too)
    return conn  # type: ignore[no-any-return]
