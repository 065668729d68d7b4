"""The PROXY protocol's side of the service: a `HeaderReader` per peer of a
`proxy_protocol` listener until its header is in, then the Connection (made by
admission) takes over the fd; the proxy's address of each proxied connection, for its
close line; the header counts and errors; the sweep of late headers.
"""

from __future__ import annotations

import select
import socket
import sys
from typing import Any, Protocol

import structlog

from epolld import handoff
from epolld.config import Config
from epolld.core.counters import Counters
from epolld.core.loop import CLOSE, Reactor
from epolld.listening.sockets import Listener
from epolld.tcp.connection import EPOLLIN, Connection, format_peer
from epolld.tcp.proxy import HeaderErrors, HeaderReader, ProxyHeader, is_trusted

log = structlog.get_logger("epolld")


class Admission(Protocol):
    """What the readers need of admission (service/admission.py), which owns them in turn:
    the limits and counts a header is checked against, and the making of its connection."""

    counters: Counters
    per_ip: dict[str, int]
    conn_count: int
    edge: bool
    stopping: bool
    handed_over: bool

    @property
    def conn_class(self) -> type[Connection]: ...

    def start(
        self,
        sock: socket.socket,
        ip: str,
        peer: str | None,
        listener: str,
        proxy: str = "",
        header: ProxyHeader | None = None,
    ) -> Connection: ...

    def log_unserved(
        self,
        peer: str,
        fd: int,
        opened_at: float | None,
        reason: str,
        error: str | None = None,
        **fields: Any,
    ) -> None: ...

    def count_refused(self, limit: str, value: int, peer_ip: str | None, **fields: Any) -> None: ...

    def on_drained(self) -> None: ...


class Proxied:
    """The readers of PROXY headers (their owner) and the proxied connections' proxies.

    Args:
        reactor: the process's reactor.
        config: the configuration in force (`configure()` switches it).
        admission: makes the connection once a header is in, and keeps the limits.
    """

    def __init__(self, reactor: Reactor, config: Config, admission: Admission) -> None:
        self.reactor = reactor
        self._config = config
        self._admission = admission
        self.readers: dict[int, HeaderReader] = {}  # PROXY headers still being read
        self.proxies: dict[int, str] = {}  # fd -> the proxy's address, for proxied clients
        self._counters = admission.counters  # headers read; errors counted straight in it
        self.header_errors = HeaderErrors(self._counters.proxy_header_errors)
        self._sweep_armed = False  # a _sweep_readers call is scheduled

    def configure(self, new: Config) -> None:
        self._config = new

    def read_header(self, sock: socket.socket, addr: Any, ip: str, listener: Listener) -> None:
        """Start reading a PROXY header, if the peer is a trusted proxy."""
        sock.setblocking(False)
        proxy = format_peer(sock.family, addr) if ip else listener.name
        now = self.reactor.now
        if not is_trusted(ip, self._config.proxy.trusted):
            sock.close()
            self.header_errors.record("untrusted_source", now, log, proxy=proxy)
            return
        if ip:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # The Connection's own mask, so that replacing the reader needs no epoll_ctl.
        mask = self._admission.conn_class.INITIAL_MASK
        reader = HeaderReader(
            sock,
            ip,
            proxy,
            listener=listener.name,
            mask=mask,
            now=now,
            owner=self,
            reschedule=self.reactor.reschedule,
        )
        self.readers[reader.fd] = reader  # in order of opened_at: see _sweep_readers
        self.reactor.add(reader)
        if not self._sweep_armed:
            self._arm_sweep()

    def _arm_sweep(self) -> None:
        """Sweep for late headers while readers exist; no timer runs while none do."""
        self._sweep_armed = True
        # A header is closed within proxy.timeout plus a fifth of it (at most 1 s more).
        self.reactor.call_later(min(1.0, self._config.proxy.timeout_s / 5), self._sweep_readers)

    def header_read(self, reader: HeaderReader, header: ProxyHeader) -> int:
        """The client's address is known: check its per-IP limit, then start echoing."""
        self._counters.proxy_headers_read += 1
        if header.source is None:  # LOCAL, UNKNOWN: the proxy itself (a health check)
            ip, peer = reader.ip, reader.peer
        else:
            ip, port = header.source
            peer = format_peer(socket.AF_INET6 if ":" in ip else socket.AF_INET, (ip, port))
        admission = self._admission
        limit = self._config.limits.max_connections_per_ip
        if ip and limit and admission.per_ip.get(ip, 0) >= limit:
            self._refuse_proxied(reader, peer, ip, limit)
            return CLOSE  # the reactor closes the reader; reader_closed() forgets it
        del self.readers[reader.fd]
        conn = admission.start(
            reader.sock, ip, peer, reader.listener, proxy=reader.peer, header=header
        )
        self.proxies[conn.fd] = reader.peer
        self.reactor.replace(reader, conn)
        if admission.edge:
            # Bytes behind the header are queued, and so may be the client's FIN: the
            # reader's events took the edges that announced them, and no new edge will
            # come. EPOLLRDHUP makes the connection read past a short read to EAGAIN or
            # EOF; with EPOLLIN alone it stopped at the payload and never saw the FIN.
            self.reactor.reschedule((conn.fd, EPOLLIN | select.EPOLLRDHUP))
        return reader.mask

    def _refuse_proxied(self, reader: HeaderReader, peer: str, ip: str, limit: int) -> None:
        """A proxied client over max_connections_per_ip: counted and warned as at accept."""
        admission = self._admission
        admission.log_unserved(peer, reader.fd, reader.opened_at, "limit", proxy=reader.peer)
        admission.count_refused("max_connections_per_ip", limit, ip, proxy=reader.peer)

    def header_failed(self, reader: HeaderReader, reason: str, detail: str) -> None:
        """No valid header: counted, warned of at a bounded rate; the reader closes next."""
        self.header_errors.record(reason, self.reactor.now, log, proxy=reader.peer, detail=detail)
        self._admission.log_unserved(
            reader.peer, reader.fd, reader.opened_at, "proxy_header", reason
        )

    def _sweep_readers(self) -> None:
        """Close the readers older than proxy.timeout (a new timeout applies to all).

        Readers are kept in the order they were accepted, so the sweep stops at the
        first one still in time: it costs one look per expired reader, not one per reader,
        and a finished header leaves nothing behind (a per-reader timer would stay in the
        heap until due, holding the reader: at 50,000 accepts/s that is 250,000 of them).
        """
        self._sweep_armed = False
        if self._admission.handed_over:  # the next process times the headers out
            return
        timeout_s = self._config.proxy.timeout_s
        deadline = self.reactor.now - timeout_s
        expired = []
        for reader in self.readers.values():
            if reader.opened_at > deadline:
                break
            expired.append(reader)
        for reader in expired:
            self.header_failed(reader, "timeout", f"no complete header within {timeout_s}s")
            self.reactor.close(reader)
        if self.readers and not self._admission.stopping:
            self._arm_sweep()

    def reader_closed(self, reader: HeaderReader) -> None:
        """Forget a reader whose socket was closed (failure, timeout, refusal, shutdown)."""
        if self.readers.get(reader.fd) is reader:
            del self.readers[reader.fd]
        admission = self._admission
        if admission.stopping and not admission.conn_count and not self.readers:
            admission.on_drained()

    def close_readers(self) -> None:
        """Nothing to echo yet, so nothing to drain: every reader closes (a stop, the end)."""
        for reader in list(self.readers.values()):
            self.reactor.close(reader)

    def restore_header_reader(self, record: dict[str, Any], state: handoff.State) -> None:
        """A PROXY header half read: the reader goes on (its timeout from the accept)."""
        sock = socket.socket(fileno=state.take_fd(record["fd"]))
        sock.setblocking(False)
        reader = HeaderReader(
            sock,
            sys.intern(str(record["ip"])),
            str(record["peer"]),
            listener=str(record["listener"]),
            mask=self._admission.conn_class.INITIAL_MASK,
            now=float(record["opened_at"]),
            owner=self,
            reschedule=self.reactor.reschedule,
        )
        reader.active_at = float(record["active_at"])
        try:
            reader.restore_parser(record["parser"], state)
        except (KeyError, TypeError):
            sock.close()
            raise
        self.readers[reader.fd] = reader
        self.reactor.add(reader)
        if not self._sweep_armed:
            self._arm_sweep()
