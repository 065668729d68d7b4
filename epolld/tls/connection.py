"""A TLS client: OpenSSL reads and writes the non-blocking socket itself.

The listener's SSLContext wraps the accepted socket (SSLContext._wrap_socket, the C object
under ssl.SSLSocket): read(n, buf) does the recv() and the decryption and write(data) the
encryption and the send() in C, so an echoed record costs two calls from Python. An
SSLObject over two MemoryBIOs (the first design) cost a recv(), a BIO write, a read, a
write, a BIO read, a copy and a send per round trip, at about twice the CPU per round
trip (docs/benchmarks.md, TLS ping-pong). OpenSSL never touches epoll: the reactor still
owns every registration, and level and edge triggers work as for plain connections.

ssl.SSLSocket itself is not used: its constructor detaches the socket object and, when
the peer is gone before the wrap (ENOTCONN), reads from it and closes the descriptor
itself, behind the reactor's back; and each of its calls adds two Python frames.

OpenSSL reads a record's 5-byte header, then its body, never further (no read-ahead):
what follows stays in the kernel, so level mode's one read per event is one record, and
a PROXY header reader that takes only the header's bytes leaves the ClientHello there.

Phases: HANDSHAKE (bounded by tls.handshake_timeout: TlsServing sweeps), ECHO, CLOSING
(our close_notify follows once the pending echo is written) and LINGER (after our FIN:
discard what the peer still sends until its FIN). `out` holds plaintext OpenSSL has not
taken yet (the socket was full): above high_water reading stops, and it resumes once
OpenSSL has written all of it, so a client that writes without reading leaves at most
high_water plus one event's records here.
"""

from __future__ import annotations

import contextlib
import fcntl
import select
import socket
import ssl
import termios
from typing import TYPE_CHECKING, Any, Final, Protocol

from epolld.core.loop import CLOSE
from epolld.tcp.connection import (
    EDGE_MASK,
    EDGE_READS_PER_EVENT,
    EPOLLIN,
    EPOLLOUT,
    EPOLLRDHUP,
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
RECORD_BYTES: Final = 16 * 1024  # the most plaintext one TLS record carries
_NOTHING_QUEUED: Final = bytes(4)  # FIONREAD's answer (an int) for an empty receive queue

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
    if isinstance(error, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return "eof"
    return _FAILURE_REASONS.get(str(error.reason), "other")


def _queued(fd: int) -> bool:
    """Whether the socket's receive queue holds bytes (FIONREAD: no read, no exception)."""
    return fcntl.ioctl(fd, termios.FIONREAD, _NOTHING_QUEUED) != _NOTHING_QUEUED


class TlsOwner(Protocol):
    """What a TLS connection reports to (tls/serving.py's TlsServing)."""

    def handshake_done(self, conn: TlsConnection) -> None: ...

    def handshake_failed(self, conn: TlsConnection, reason: str, detail: str) -> None: ...

    def tls_closed(self, conn: TlsConnection) -> None: ...

    def handoff_flush_left(self) -> float:
        """Seconds a restart may still wait for TLS sockets to take their last bytes."""
        ...


class TlsConnection(Connection):
    """One TLS client (level or edge, as `edge` says); the echo is of decrypted bytes.

    bytes_in counts plaintext received; out holds plaintext OpenSSL has not taken yet,
    so bytes_out is Connection's (received less pending less dropped).

    Args:
        sock, ip, buf, shared, now, peer: as Connection.
        context: the listener's SSLContext (an SNI callback may switch it).
        owner: counts and logs handshakes, and sweeps handshakes that take too long.
        edge: registered edge-triggered (EDGE_MASK) instead of level.
    """

    __slots__ = ("__weakref__", "edge_mode", "phase", "sni", "tls", "tls_owner")

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
        # The owner (a weak reference) is what the SNI callback gets: see `context`.
        self.tls: Any = context._wrap_socket(sock, True, owner=self)  # type: ignore[attr-defined]
        self.tls_owner = owner
        self.phase = HANDSHAKE
        self.sni: str | None = None  # the client's server name, set by the SNI callback
        self.edge_mode = edge
        self.mask = EDGE_MASK if edge else LEVEL_READ

    @property
    def context(self) -> ssl.SSLContext:
        """The session's context; the SNI callback sets another one (context.py)."""
        return self.tls.context  # type: ignore[no-any-return]

    @context.setter
    def context(self, context: ssl.SSLContext) -> None:
        self.tls.context = context

    @property
    def edge(self) -> bool:
        return self.edge_mode

    @property
    def handshaking(self) -> bool:
        return self.phase == HANDSHAKE

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
        if self.phase == HANDSHAKE:
            return self._handshake(ev)
        if ev & EPOLLOUT and self.out:
            was_paused = not self.reading and not self.eof
            if not self._flush():
                return CLOSE
            if was_paused and self.reading:
                ev |= EPOLLIN  # what waited while paused raises no new edge
        reading = ev & (EPOLLIN | EPOLLHUP) and self.reading and self.phase == ECHO
        if reading and not self._read(ev, EDGE_READS_PER_EVENT if self.edge_mode else 1):
            return CLOSE
        return self._wait()

    def _handshake(self, ev: int) -> int:
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            return self._wait_readable()
        except ssl.SSLWantWriteError:
            return self._wait_writable()
        except ssl.SSLError as e:  # OpenSSL has sent the alert that says why, if it could
            return self._failed(failure_reason(e), str(e.reason or e))
        except OSError as e:
            return self._failed("reset", str(e))
        self.phase = ECHO
        self.tls_owner.handshake_done(self)
        # Records may have come behind the client's Finished: read them now (in edge
        # mode their edge was this event's).
        if ev & EPOLLRDHUP or _queued(self.fd):
            return self.on_event(ev | EPOLLIN)
        return self._wait()

    def _read(self, ev: int, budget: int) -> bool:
        """Decrypt records and echo them, at most budget of them; False: close now.

        Level mode reads one record per event: OpenSSL leaves the rest in the kernel, and
        epoll reports it again. Edge mode reads until the receive queue is empty (asked
        with FIONREAD: the read that finds it so would raise SSLWantReadError, which _ssl
        builds with a formatted message), or, when the event says the peer shut down
        (EPOLLRDHUP), until the EOF: tcp/connection.py's short-read rule, for records.
        """
        tls, buf = self.tls, self.buf
        size = len(buf)
        while True:
            try:
                n = tls.read(size, buf)
            except ssl.SSLWantReadError:
                return True
            except ssl.SSLEOFError:  # a FIN without close_notify
                self.reason = "truncated"
                self.eof = True
                self.reading = False
                return True
            except ssl.SSLWantWriteError:
                # OpenSSL must send an answer first (to a key update) and the socket is
                # full. Read again next turn (until the socket takes it): the record has
                # left the kernel's queue, so no EPOLLIN comes for it, and an EPOLLOUT
                # event does not read.
                self.shared.reschedule((self.fd, EPOLLIN))
                return True
            except ssl.SSLError as e:
                self.reason = "error"
                self.error = f"tls: {e.reason or e}"
                return False
            except OSError as e:
                self._fail(e)
                return False
            if not n:  # the client's close_notify: its echo, then ours
                self.reason = self.reason or "eof"
                self.phase = CLOSING
                self.reading = False
                return True
            self.bytes_in += n
            if self.out:
                self._buffer(buf[:n])
            else:
                try:
                    tls.write(buf[:n])
                except ssl.SSLWantWriteError:  # the socket is full: OpenSSL holds a part
                    self._buffer(buf[:n])
                except ssl.SSLError as e:
                    self.reason = "error"
                    self.error = f"tls: {e.reason or e}"
                    return False
                except OSError as e:
                    self._fail(e)
                    return False
            if n == size and tls.pending():
                continue  # a record larger than the buffer: the rest is OpenSSL's, not the kernel's
            budget -= 1
            if not self.reading:
                return True
            if not budget:
                if self.edge_mode:
                    self.shared.reschedule((self.fd, ev & (EPOLLIN | EPOLLRDHUP) or EPOLLIN))
                return True
            if not ev & EPOLLRDHUP and not _queued(self.fd):
                return True

    def _flush(self) -> bool:
        """Hand the pending plaintext to OpenSSL again (a retry must start with the same
        bytes, which `out` does). False: the connection failed."""
        try:
            self.tls.write(self.out)
        except ssl.SSLWantWriteError:
            return True
        except ssl.SSLError as e:
            self.reason = "error"
            self.error = f"tls: {e.reason or e}"
            return False
        except OSError as e:
            self._fail(e)
            return False
        self.out = NO_OUTPUT
        if not self.reading and not self.eof and self.phase == ECHO:
            self.reading = True  # on_event reads at once: what waited raises no new edge
        return True

    def _wait(self) -> int:
        """What to wait for next (or CLOSE); sends our close_notify once it is due."""
        if self.phase == CLOSING and not self.out:
            return self._close_notify()
        if self.phase == ECHO and self.eof and not self.out:
            return CLOSE  # truncated, and everything echoed
        if self.edge_mode:
            return EDGE_MASK
        if self.out:
            return EPOLLOUT | (LEVEL_READ if self.reading else 0)
        return LEVEL_READ

    def _close_notify(self) -> int:
        """Our close_notify (the echo is written), then FIN."""
        try:
            self.tls.shutdown()
        except ssl.SSLWantReadError:
            pass  # ours is sent; we do not wait for the peer's
        except ssl.SSLWantWriteError:
            return self._wait_writable()
        except OSError:  # ssl.SSLError too: the peer went; FIN (or the failure) follows
            pass
        return self._shut_write()

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
        # Take what the peer sent (OpenSSL stopped at the record it refused): closing
        # with unread bytes would send a reset instead of a FIN after the alert.
        with contextlib.suppress(OSError):
            self.sock.recv_into(self.buf)
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
        if not self._farewell():
            return CLOSE
        return self._wait()

    def _farewell(self) -> bool:
        """Read what the socket holds (bounded), echo it; our close_notify is next.
        False: the connection failed."""
        if self.phase != ECHO:
            return True
        if self.reading and not self._read(EPOLLIN | EPOLLRDHUP, EDGE_READS_PER_EVENT):
            return False
        if self.phase == ECHO:
            self.phase = CLOSING
            self.reading = False
        return True

    HANDOFF_KIND = "tls_closing"

    def handoff_state(self, out: StateWriter) -> dict[str, Any]:
        """A TLS session cannot travel (no kernel TLS): echo what arrived, send our
        close_notify and FIN, and hand over only the socket, which the next process
        keeps until the peer's FIN (TlsServing.restore_closing). OpenSSL holds what the
        socket has not taken, so this waits for the socket, within the owner's budget."""
        if self.phase in (ECHO, CLOSING):
            self._farewell()
            self._flush_for_handoff()
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
            "out": None,
        }

    def _flush_for_handoff(self) -> None:
        """Write the pending echo and our close_notify, waiting for the socket at most
        what the restart's budget has left; then FIN (LINGER). What the socket did not
        take in time is lost: the client sees a stream without close_notify."""
        if self.phase != CLOSING:
            return
        if self.out:
            left = self.tls_owner.handoff_flush_left()
            if left <= 0:
                return
            self.sock.settimeout(left)  # _ssl waits for the socket up to this
            try:
                self.tls.write(self.out)
            except OSError:  # timed out (or the peer went)
                return
            finally:
                self.sock.settimeout(0.0)
            self.out = NO_OUTPUT
        self._close_notify()

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
