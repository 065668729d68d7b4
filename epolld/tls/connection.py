"""A TLS client: ssl.SSLObject over two MemoryBIOs on the non-blocking socket.

The socket stays plain: this handler reads ciphertext with recv() into the incoming BIO,
lets OpenSSL decrypt and re-encrypt each record's plaintext (the echo), and sends what
the outgoing BIO holds. OpenSSL never touches the descriptor, so the reactor stays the
only one that calls epoll, and level and edge triggers work as for plain connections.

Phases: HANDSHAKE (bounded by tls.handshake_timeout: TlsServing sweeps), ECHO, CLOSING
(our close_notify queued: flush, then FIN) and LINGER (after our FIN: discard what the
peer still sends until its FIN). Backpressure counts ciphertext waiting for the socket:
above high_water reading stops, at low_water it resumes, so a client that writes
without reading leaves at most high_water plus one read's records here.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
from typing import TYPE_CHECKING, Any, Final, Protocol

from epolld.core.loop import CLOSE
from epolld.tcp.connection import (
    EDGE_BYTES_PER_EVENT,
    EDGE_MASK,
    EDGE_READS_PER_EVENT,
    EPOLLIN,
    EPOLLOUT,
    LEVEL_READ,
    NO_OUTPUT,
    Connection,
    SharedSettings,
)

if TYPE_CHECKING:
    from epolld.handoff import StateWriter

EPOLLERR: Final = select.EPOLLERR
EPOLLHUP: Final = select.EPOLLHUP

HANDSHAKE, ECHO, CLOSING, LINGER = 0, 1, 2, 3
RECORD_BYTES: Final = 16 * 1024  # SSLObject.read() returns at most one record's plaintext

# OpenSSL's reason codes (ssl.SSLError.reason) -> the failure reasons we count.
_FAILURE_REASONS: Final = {
    "WRONG_VERSION_NUMBER": "not_tls",
    "HTTP_REQUEST": "not_tls",
    "HTTPS_PROXY_REQUEST": "not_tls",
    "PACKET_LENGTH_TOO_LONG": "not_tls",
    "RECORD_LENGTH_MISMATCH": "not_tls",
    "UNEXPECTED_MESSAGE": "not_tls",
    "RECORD_LAYER_FAILURE": "not_tls",
    "UNSUPPORTED_PROTOCOL": "unsupported_version",
    "TLSV1_ALERT_PROTOCOL_VERSION": "unsupported_version",
    "VERSION_TOO_LOW": "unsupported_version",
    "NO_SHARED_CIPHER": "no_shared_cipher",
    "NO_SUITABLE_SIGNATURE_ALGORITHM": "no_shared_cipher",
    "NO_SHARED_GROUPS": "no_shared_cipher",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no_client_certificate",
    "CERTIFICATE_VERIFY_FAILED": "bad_client_certificate",
    "UNEXPECTED_EOF_WHILE_READING": "eof",
}


def failure_reason(error: ssl.SSLError) -> str:
    """The counted reason for a failed handshake."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return "bad_client_certificate"
    if isinstance(error, ssl.SSLEOFError):
        return "eof"
    return _FAILURE_REASONS.get(str(error.reason), "other")


class TlsOwner(Protocol):
    """What a TLS connection reports to (tls/serving.py's TlsServing)."""

    def handshake_done(self, conn: TlsConnection) -> None: ...

    def handshake_failed(self, conn: TlsConnection, reason: str, detail: str) -> None: ...

    def tls_closed(self, conn: TlsConnection) -> None: ...


class TlsConnection(Connection):
    """One TLS client (level or edge, as `edge` says); the echo is of decrypted bytes.

    bytes_in counts plaintext received, bytes_out plaintext handed to OpenSSL to echo;
    out holds ciphertext waiting for the socket.

    Args:
        sock, ip, buf, shared, now, peer: as Connection.
        context: the listener's SSLContext (an SNI callback may switch it).
        owner: counts and logs handshakes, and sweeps handshakes that take too long.
        edge: registered edge-triggered (EDGE_MASK) instead of level.
    """

    __slots__ = ("echoed", "edge_mode", "inbio", "outbio", "phase", "tls", "tls_owner")

    def __init__(
        self,
        sock: socket.socket,
        ip: str,
        *,
        buf: memoryview,
        shared: SharedSettings,
        now: float,
        peer: str | None = None,
        context: ssl.SSLContext,
        owner: TlsOwner,
        edge: bool,
    ) -> None:
        super().__init__(sock, ip, buf=buf, shared=shared, now=now, peer=peer)
        self.inbio = ssl.MemoryBIO()
        self.outbio = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.inbio, self.outbio, server_side=True)
        self.tls_owner = owner
        self.phase = HANDSHAKE
        self.echoed = 0
        self.edge_mode = edge
        self.mask = EDGE_MASK if edge else LEVEL_READ

    @property
    def edge(self) -> bool:
        return self.edge_mode

    @property
    def handshaking(self) -> bool:
        return self.phase == HANDSHAKE

    @property
    def bytes_out(self) -> int:
        return self.echoed - self.dropped

    def discard_pending(self) -> None:
        self.out = NO_OUTPUT

    def close(self) -> None:
        self.tls_owner.tls_closed(self)
        super().close()

    # -- events ------------------------------------------------------------------------

    def on_event(self, ev: int) -> int:
        if ev & EPOLLERR:
            if self.phase == HANDSHAKE:
                self._failed("reset", "socket error during the handshake")
            return self._on_hangup()
        if self.phase == LINGER:
            return self._on_lingering(ev)
        if ev & EPOLLOUT and self.out:
            was_paused = not self.reading and not self.eof
            if not self._flush():
                return CLOSE
            if was_paused and self.reading:
                ev |= EPOLLIN  # what waited while paused raises no new edge
        reading = ev & (EPOLLIN | EPOLLHUP) and self.reading and self.phase <= ECHO
        if reading and not self._receive(ev):
            return CLOSE
        return self._progress()

    def _receive(self, ev: int) -> bool:
        """Ciphertext from the socket into the incoming BIO: one recv() in level mode,
        until EAGAIN within the per-event budget in edge mode. False: the socket failed."""
        sock, buf, inbio = self.sock, self.buf, self.inbio
        budget = EDGE_READS_PER_EVENT if self.edge_mode else 1
        left = EDGE_BYTES_PER_EVENT
        while True:
            try:
                n = sock.recv_into(buf)
            except BlockingIOError:
                return True
            except OSError as e:
                if self.phase == HANDSHAKE:
                    self._failed("reset", str(e))
                self._fail(e)
                return False
            if not n:
                self.eof = True
                self.reading = False
                inbio.write_eof()
                return True
            inbio.write(buf[:n])
            budget -= 1
            left -= n
            if not budget or left <= 0:
                if self.edge_mode:
                    self.shared.reschedule((self.fd, ev & EPOLLIN or EPOLLIN))
                return True
            if self.phase == ECHO and self.inbio.pending >= self.shared.high_water:
                return True

    def _progress(self) -> int:
        """Handshake or echo what the incoming BIO holds, send, and say what to wait for."""
        if self.phase == HANDSHAKE:
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                if self.eof:
                    return self._failed("eof", "the peer closed during the handshake")
                self._collect()  # our part of the handshake (ServerHello and on)
                return self._send_and_wait()
            except ssl.SSLError as e:
                self._collect()
                self._send_once()  # the alert saying why, if the socket takes it
                return self._failed(failure_reason(e), str(e.reason or e))
            self.phase = ECHO
            self.tls_owner.handshake_done(self)
        if self.phase == ECHO:
            tls, inbio = self.tls, self.inbio
            # Only while there is something to read: the read after the last record could
            # only raise SSLWantReadError, and building that exception per event cost ~40%
            # of the server's CPU per round trip (bench/analysis.md, tls-pingpong).
            while inbio.pending or tls.pending() or self.eof:
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
                    return CLOSE
                if not data:  # the client's close_notify (_ssl returns b"" for it)
                    self.reason = self.reason or "eof"
                    self._close_notify()
                    break
                self.bytes_in += len(data)
                tls.write(data)
                self.echoed += len(data)
            self._collect()
        return self._send_and_wait()

    def _collect(self) -> None:
        """Move what OpenSSL wrote (records, alerts) to the socket's output."""
        data = self.outbio.read()
        if data:
            if self.out:
                self.out += data
            else:
                self.out = bytearray(data)
            if len(self.out) >= self.shared.high_water and self.phase == ECHO:
                self.reading = False

    def _send_once(self) -> None:
        if self.out:
            with contextlib.suppress(OSError):  # the peer went; the alert was a courtesy
                self.sock.send(self.out)
            self.out = NO_OUTPUT

    def _close_notify(self) -> None:
        """Queue our close_notify; after it only a FIN follows."""
        try:
            self.tls.unwrap()
        except ssl.SSLWantReadError:
            pass  # ours is written; we do not wait for the peer's
        except ssl.SSLError:
            pass
        self.phase = CLOSING
        self.reading = False  # what follows a close_notify is not read, only its FIN
        self._collect()

    def _send_and_wait(self) -> int:
        if self.out:
            was_paused = not self.reading and not self.eof
            if not self._flush():
                return CLOSE
            if was_paused and self.reading and self.edge_mode:
                # What waited in the socket while paused raises no new edge.
                self.shared.reschedule((self.fd, EPOLLIN))
        if self.phase == CLOSING and not self.out:
            return self._shut_write()
        if self.phase == ECHO and self.eof and not self.out:
            return CLOSE  # truncated (or closed) and everything echoed
        if self.edge_mode:
            return EDGE_MASK
        reading = self.reading and self.phase <= ECHO
        if self.out:
            return EPOLLOUT | (LEVEL_READ if reading else 0)
        return LEVEL_READ if reading else CLOSE

    def _shut_write(self) -> int:
        """FIN after our close_notify, then linger until the peer's FIN."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as e:
            return self._fail(e)
        self.phase = LINGER
        if self.eof:
            return CLOSE
        return self._wait_readable()

    def _failed(self, reason: str, detail: str) -> int:
        self.reason = "tls_handshake"
        self.error = reason
        self.tls_owner.handshake_failed(self, reason, detail)
        return CLOSE

    # -- shutdown and restart ----------------------------------------------------------

    def begin_shutdown(self) -> int:
        """SIGTERM: echo what has arrived, then close_notify and FIN (a handshake in
        progress is closed: nothing was echoed yet)."""
        self.reason = self.reason or "shutdown"
        if self.phase == HANDSHAKE:
            return CLOSE
        if self.phase == LINGER:
            return self._wait_readable()
        self._farewell()
        return self._send_and_wait()

    def _farewell(self) -> None:
        """Read what the socket holds (bounded), echo it, queue our close_notify."""
        if self.phase != ECHO:
            return
        self.reading = not self.eof
        for _ in range(EDGE_READS_PER_EVENT):
            if not self.reading:
                break
            try:
                n = self.sock.recv_into(self.buf)
            except BlockingIOError:
                break
            except OSError:
                break
            if not n:
                self.eof = True
                self.inbio.write_eof()
                break
            self.inbio.write(self.buf[:n])
        self._progress_echo_only()
        if self.phase == ECHO:
            self._close_notify()

    def _progress_echo_only(self) -> None:
        phase_reading = self.reading
        self.reading = True  # no pause on the way out: this is bounded by the reads above
        self._progress_no_send()
        self.reading = phase_reading

    def _progress_no_send(self) -> None:
        tls = self.tls
        while self.phase == ECHO:
            try:
                data = tls.read(RECORD_BYTES)
            except ssl.SSLZeroReturnError:
                data = b""
            except ssl.SSLError:
                break
            if not data:  # close_notify
                self._close_notify()
                break
            self.bytes_in += len(data)
            tls.write(data)
            self.echoed += len(data)
        self._collect()

    HANDOFF_KIND = "tls_closing"

    def handoff_state(self, out: StateWriter) -> dict[str, Any]:
        """A TLS session cannot travel (no kernel TLS): echo what arrived, queue our
        close_notify, and hand over only the socket with the ciphertext still to send;
        the next process sends it, then FIN (TlsServing.restore_closing)."""
        if self.phase in (ECHO, CLOSING):
            self._farewell()
            if self.out:
                try:
                    sent = self.sock.send(self.out)
                    del self.out[:sent]  # type: ignore[union-attr]
                except OSError:
                    pass
        return {
            "kind": self.HANDOFF_KIND,
            "fd": out.fd(self.fd),
            "ip": self.ip,
            "peer": self._peer,
            "edge": self.edge_mode,
            "handshaking": self.phase == HANDSHAKE,
            "eof": self.eof,
            "shut": self.phase == LINGER,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "opened_at": self.opened_at,
            "out": out.data(bytes(self.out)) if self.out else None,
        }

    def __repr__(self) -> str:
        phase = ("handshake", "echo", "closing", "linger")[self.phase]
        return f"<TlsConnection fd={self.fd} peer={self.peer} {phase} pending={self.pending()}>"


class ClosingSocket:
    """A TLS connection's socket after a restart: send the ciphertext the previous
    process left (its echo and close_notify), FIN, then discard until the peer's FIN or
    the deadline (a lingering close: closing with unread data would send a reset).

    Args:
        sock: the socket, non-blocking.
        out: ciphertext still to send.
        shut: FIN was sent already.
        edge: register edge-triggered.
        done: called once when it closes.
    """

    __slots__ = ("active_at", "done", "edge", "fd", "mask", "out", "shut", "sock")

    def __init__(
        self, sock: socket.socket, out: bytes, *, shut: bool, edge: bool, done: Any
    ) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.out = bytearray(out)
        self.shut = shut
        self.edge = edge
        self.done = done
        self.active_at = 0.0
        self.mask = self._mask()

    def _mask(self) -> int:
        if self.edge:
            return EDGE_MASK
        return EPOLLOUT if self.out else LEVEL_READ

    def start(self) -> int:
        """Send at once what the socket takes; the mask to register with (or CLOSE)."""
        return self.on_event(EPOLLOUT)

    def on_event(self, ev: int) -> int:
        if ev & EPOLLERR:
            return CLOSE
        if self.out:
            try:
                sent = self.sock.send(self.out)
            except BlockingIOError:
                sent = 0
            except OSError:
                return CLOSE
            del self.out[:sent]
            if self.out:
                return self._mask()
        if not self.shut:
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                return CLOSE
            self.shut = True
        for _ in range(EDGE_READS_PER_EVENT):
            try:
                data = self.sock.recv(RECORD_BYTES)
            except BlockingIOError:
                return self._mask()
            except OSError:
                return CLOSE
            if not data:
                return CLOSE
        return self._mask()

    def close(self) -> None:
        self.sock.close()
        self.done(self)
