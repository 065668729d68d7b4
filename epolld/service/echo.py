"""The echo service's policy: accepting and limits, per-IP counts, the shutdown drain,
reload reconciliation and statistics. Epoll itself is the reactor's (loop.py).

Accepting at EMFILE/ENFILE/ENOBUFS/ENOMEM leaves the connection in the backlog, so a
level-triggered listener reports it again at once (381,189 wakeups in 1 s, measured):
the listener is taken out of the reactor and re-armed after ACCEPT_RETRY_S (nginx
waits 500 ms, asyncio 1 s; bpo-27906).
"""

from __future__ import annotations

import errno
import mmap
import os
import resource
import select
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import structlog

from epolld import __version__, handoff
from epolld import config as config_mod
from epolld.config import Config
from epolld.core.counters import Counters, DurationHistogram, Snapshot
from epolld.core.idle import IdleTimer
from epolld.core.loop import CLOSE, Reactor
from epolld.errors import EpolldError
from epolld.listening.listener_set import STREAM, TLS, UDP, ListenerSet, kind_of
from epolld.listening.sockets import Listener
from epolld.observability import logsetup
from epolld.systemd import Notifier
from epolld.tcp.connection import EPOLLIN, Connection, SharedSettings, format_peer
from epolld.tcp.proxy import HeaderErrors, HeaderReader, ProxyHeader, is_trusted
from epolld.tcp.splice import SpliceConnection, connection_class, make_pipe
from epolld.udp.endpoint import UdpEndpoints

if TYPE_CHECKING:  # epolld.metrics loads prometheus_client: imported only when metrics are on
    from epolld.listening.listener_set import Plan
    from epolld.observability.metrics import MetricsApp, MetricsEndpoint
    from epolld.tls.serving import TlsServing  # imports ssl: only with a TLS listener

log = structlog.get_logger("epolld")

ACCEPT_RETRY_S = 0.5  # pause after EMFILE & co. before accepting again
REFUSED_WARNING_EVERY_S = 10.0  # at most one "connection_refused" warning per this
STATUS_EVERY_S = 5.0  # STATUS= refresh for systemctl status
HANDOFF_SIGNAL = signal.SIGUSR2  # the unit's RestartKillSignal=; re-exec without systemd
BARRIER_TIMEOUT_S = 10.0  # for systemd to take the handoff's descriptors into its store
IDLE_CLOSES_PER_TURN = 500  # ~5-10 ms of closing between two polls
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# The peer went away between the handshake and accept(); nothing to do (accept(2)).
ACCEPT_IGNORED_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})


class EchoService:
    """Serve echo on listeners until a stop signal.

    Args:
        config: the validated configuration.
        listeners: bound (or inherited) listening sockets; the service owns them.
        notifier: sd_notify; a no-op outside systemd.
        reload: called on SIGHUP; returns the new Config or raises ConfigError.
        metrics_listener: bound for metrics.listen, if set; the service owns it.
        handoff_signal: SIGUSR2 starts a restart handoff (a worker's comes from its
            supervisor instead, which calls hand_over()).
    """

    def __init__(
        self,
        config: Config,
        listeners: list[Listener],
        notifier: Notifier,
        reload: Callable[[], Config] | None = None,
        metrics_listener: Listener | None = None,
        *,
        handoff_signal: bool = True,
    ) -> None:
        self._config = config
        self._notifier = notifier
        self._reload_source = reload
        self.reactor = Reactor()
        # The reactor's handler map holds the connections; the service only counts them
        # (a second dict would cost ~50 bytes per connection).
        self._conn_count = 0
        self._listeners: dict[int, Listener] = {}  # registered with the reactor
        self._paused: dict[int, Listener] = {}  # listeners waiting out EMFILE & co.
        self._accept_queue: list[Listener] = []  # ready listeners, served after the batch
        self._per_ip: dict[str, int] = {}
        self._readers: dict[int, HeaderReader] = {}  # PROXY headers still being read
        self._proxies: dict[int, str] = {}  # fd -> the proxy's address, for proxied clients
        self._header_errors = HeaderErrors()
        self._headers_read = 0
        self._sweep_armed = False  # a _sweep_readers call is scheduled
        self._started_at = self.reactor.now
        self._stopping = False
        self._done = False
        self._paused_since: float | None = None  # the current EMFILE episode
        self._splice_fallback = False  # no pipe to be had: new connections copy instead
        self._pipes = 0  # open splice connections, each holding a pipe (2 fds)
        # What the process holds before any client (stdio, epoll, listeners, ...), plus
        # room for log files and the pidfile.
        self._base_fds = len(os.listdir("/proc/self/fd")) + 16
        for signum, fn in {
            signal.SIGTERM: self._on_stop_signal,
            signal.SIGINT: self._on_stop_signal,
            signal.SIGHUP: self._on_reload_signal,
            signal.SIGUSR1: self._on_stats_signal,
            **({HANDOFF_SIGNAL: self._on_handoff_signal} if handoff_signal else {}),
        }.items():
            self.reactor.on_signal(signum, fn)
        # Totals, updated at accept, close and reload only; live values are added when
        # reporting (snapshot(), stats()). The metrics endpoint reads them at scrape time.
        self.counters = Counters()
        self._refused_unlogged = 0
        self._refused_logged_at = -REFUSED_WARNING_EVERY_S
        self._status_bytes = (self.reactor.now, 0)
        self._idle = IdleTimer(config.limits.idle_timeout_s)
        self._expiring: list[Connection] = []  # idle, waiting for their turn to close
        self._read_buf = memoryview(bytearray())  # sized by _apply_settings
        self._shared = SharedSettings(
            high_water=config.buffers.high_water_bytes,
            low_water=config.buffers.low_water_bytes,
            reschedule=self.reactor.reschedule,
            owner=self,
            make_pipe=self._make_pipe,
        )
        self._apply_settings(config)
        self._udp = UdpEndpoints(self.reactor, config.udp, edge=self._edge)
        # Every listening socket, matched to the file on reload (one slot: this process).
        self.listener_set = ListenerSet([list(listeners)], metrics_listener)
        self._tls: TlsServing | None = None  # made when a TLS listener is first served
        # A listener's kind -> what serves it (listener_set.py).
        self._serve_kind: dict[str, Callable[[Listener], None]] = {
            STREAM: self._add_listener,
            UDP: self._udp.add,
            TLS: self._serve_tls,
        }
        for listener in listeners:
            self._serve_kind[kind_of(listener)](listener)
        # The restart handoff: what else contributes a record (the daemon's pidfile), and,
        # in the next process, the handoff it was restored from.
        self._handoff_sources: list[handoff.HandoffSource] = []
        self._handoff_pending = False
        self.handed_over = False
        self._restored: dict[str, Any] | None = None
        self._restored_at = 0.0
        self._metrics_app: MetricsApp | None = None
        self._metrics: MetricsEndpoint | None = None
        if metrics_listener is not None:
            self._metrics = self._serve_metrics(metrics_listener)

    # -- settings ----------------------------------------------------------------

    def _apply_settings(self, config: Config) -> None:
        """Cache what the hot paths read, so that they read plain attributes."""
        self._config = config
        self._edge = config.trigger == "edge"
        self._listen_mask = EPOLLIN | select.EPOLLET if self._edge else EPOLLIN
        self.reactor.trace = config.logging.level == "trace"
        self._splice = config.io == "splice"
        self._conn_class = connection_class(self._edge, self._splice)
        self._copy_class = connection_class(self._edge, splice=False)
        self._shared.high_water = config.buffers.high_water_bytes
        self._shared.low_water = config.buffers.low_water_bytes
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self._pipe_budget = max(0, (nofile - self._base_fds - config.limits.max_connections) // 2)
        if len(self._read_buf) != config.buffers.read_size_bytes:
            # Anonymous mmap, not bytearray: its pages are resident only once a read
            # reaches them (bytearray() zero-fills, 256 KiB resident from the start).
            self._read_buf = memoryview(mmap.mmap(-1, config.buffers.read_size_bytes))
        # Decided once per configuration, not per connection: the log call or None.
        if config.logging.connections:
            self._conn_log: Callable[..., Any] | None = log.info
        elif logsetup.enabled("debug"):
            self._conn_log = log.debug
        else:
            self._conn_log = None
        self._shared.name_peers = self._conn_log is not None

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def listeners(self) -> list[Listener]:
        return [*self._listeners.values(), *self._paused.values()]

    # -- running -------------------------------------------------------------------

    def run(self) -> int:
        """Report readiness and serve until stopped. Returns 0."""
        try:
            self.reactor.run(started=self._started)
            if not self.handed_over:
                log.info("shutdown_complete", **self.stats())
        finally:
            if self.handed_over:
                self._let_go()
            else:
                self._close_everything()
        return 0

    def _started(self) -> None:
        """Signals are handled from here on: tell the world we serve."""
        self._start_timers()
        for listener in [*self.listeners, *self._udp.listeners]:
            log.info(
                "listening",
                address=listener.name,
                fd=listener.fd,
                trigger=self._config.trigger,
                io="copy" if listener.is_udp else self._config.io,  # no splice for UDP
                inherited=listener.inherited,
            )
        if self._metrics is not None:
            log.info("metrics_listening", address=self._metrics.listener.name)
        self._notifier.ready(self._status_line())
        if self._restored is not None:
            self._log_handoff_complete(self._restored)

    def _finish(self) -> None:
        self._done = True
        self.reactor.stop()

    # -- accepting -----------------------------------------------------------------

    def _add_listener(self, listener: Listener) -> None:
        listener.mask = self._listener_mask(listener)
        listener.on_ready = self._listener_ready
        self._listeners[listener.fd] = listener
        self.reactor.add(listener)

    def _serve_tls(self, listener: Listener) -> None:
        """A TLS listener accepts as a plain one; _start() makes TLS connections for it."""
        self._tls_serving(self._config).listen(listener)
        self._add_listener(listener)

    def _tls_serving(self, config: Config) -> TlsServing:
        if self._tls is None:
            from epolld.tls.serving import TlsServing

            self._tls = TlsServing(self.reactor, self.counters, config)
        return self._tls

    def _listener_mask(self, listener: Listener) -> int:
        """A listener that worker processes share wakes one of them per connection
        (EPOLLEXCLUSIVE), not every worker, of which all but one would find nothing."""
        return self._listen_mask | select.EPOLLEXCLUSIVE if listener.shared else self._listen_mask

    def _listener_ready(self, listener: Listener) -> None:
        """Accept after the batch (see loop.py on fd reuse), once per listener."""
        if not self._accept_queue:
            self.reactor.call_soon(self._accept_queued)
        self._accept_queue.append(listener)

    def _accept_queued(self) -> None:
        queue, self._accept_queue = self._accept_queue, []
        if self.handed_over:
            # Queued in the batch that also handed over: the next process accepts these.
            # Accepted here, they would be left behind and reset at our exit.
            return
        for listener in queue:
            if listener.fd in self._listeners:  # not paused or closed meanwhile
                self._accept(listener)

    def _accept(self, listener: Listener) -> None:
        """Accept until EAGAIN, at most one backlog's worth per wakeup."""
        limits = self._config.limits
        now = self.reactor.now
        for _ in range(self._config.backlog):
            try:
                sock, addr = listener.sock.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in RESOURCE_ERRNOS:
                    self._pause_accepting(listener, e)
                    return
                if e.errno not in ACCEPT_IGNORED_ERRNOS:
                    log.warning("accept_failed", address=listener.name, error=str(e))
                    return
                continue
            if self._paused_since is not None:
                log.info("accept_resumed", paused_s=round(now - self._paused_since, 3))
                self._paused_since = None
            ip = addr[0] if listener.is_tcp else ""
            if self._conn_count + len(self._readers) >= limits.max_connections:
                self._refuse(sock, addr, ip, "max_connections", limits.max_connections)
                continue
            if listener.proxy_protocol:  # per-IP limits wait for the client's address
                self._read_header(sock, addr, ip, listener)
                continue
            if ip and limits.max_connections_per_ip:
                count = self._per_ip.get(ip, 0)
                if count >= limits.max_connections_per_ip:
                    self._refuse(
                        sock, addr, ip, "max_connections_per_ip", limits.max_connections_per_ip
                    )
                    continue
            self._open(sock, addr, ip, listener)
        if self._edge:  # the budget ran out before EAGAIN: no new edge will say so
            self.reactor.reschedule((listener.fd, EPOLLIN))

    def _open(self, sock: socket.socket, addr: Any, ip: str, listener: Listener) -> None:
        sock.setblocking(False)
        peer: str | None = listener.name
        if ip:
            # Echo is request/response: Nagle would hold back the tail of every reply.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # Worked out now only if it will be logged; else on first use (repr).
            peer = format_peer(sock.family, addr) if self._conn_log is not None else None
        self._start(sock, ip, peer, listener.name)

    def _start(
        self, sock: socket.socket, ip: str, peer: str | None, listener: str, proxy: str = ""
    ) -> Connection:
        """Make the Connection for an accepted socket; register it unless it takes over
        from a PROXY header reader (proxy: that reader's peer), which the caller replaces."""
        if ip:
            ip = sys.intern(ip)  # one string per address, not one per connection
            self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
        cls = self._conn_class
        context = self._tls.context_for(listener) if self._tls is not None else None
        if self._splice and context is None:  # splice cannot carry TLS (no kernel TLS)
            # Pipes stay within a budget that leaves one descriptor for each of
            # max_connections: otherwise splice connections (3 fds each) would use up
            # RLIMIT_NOFILE and later clients would wait in the backlog instead of being
            # served by copying.
            if self._pipes < self._pipe_budget:
                self._pipes += 1
            else:
                self._splice_unavailable("descriptor budget", budget=self._pipe_budget)
                cls = self._copy_class
        now = self.reactor.now
        if context is not None and self._tls is not None:
            conn: Connection = self._tls.open(
                context,
                sock,
                ip,
                buf=self._read_buf,
                shared=self._shared,
                now=now,
                peer=peer,
                edge=self._edge,
            )
        else:
            conn = cls(sock, ip, buf=self._read_buf, shared=self._shared, now=now, peer=peer)
        self._conn_count += 1
        if proxy:
            self._proxies[conn.fd] = proxy
        else:
            self.reactor.add(conn)
        self._idle.add(conn)
        self.counters.accepted += 1
        if self._conn_log is not None:
            self._conn_log(
                "connection_opened",
                peer=conn.peer,
                fd=conn.fd,
                listener=listener,
                io="splice" if isinstance(conn, SpliceConnection) else "copy",
                **({"proxy": proxy} if proxy else {}),
                **({"tls": True} if context is not None else {}),
            )
        return conn

    # -- the PROXY protocol: a HeaderReader first, then the Connection ------------------

    def _read_header(self, sock: socket.socket, addr: Any, ip: str, listener: Listener) -> None:
        """Start reading a PROXY header, if the peer is a trusted proxy."""
        sock.setblocking(False)
        proxy = format_peer(sock.family, addr) if ip else listener.name
        now = self.reactor.now
        if not is_trusted(ip, self._config.proxy.trusted):
            sock.close()
            self._header_errors.record("untrusted_source", now, log, proxy=proxy)
            return
        if ip:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # The Connection's own mask, so that replacing the reader needs no epoll_ctl.
        mask = self._conn_class.INITIAL_MASK
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
        self._readers[reader.fd] = reader  # in order of opened_at: see _sweep_readers
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
        self._headers_read += 1
        if header.source is None:  # LOCAL, UNKNOWN: the proxy itself (a health check)
            ip, peer = reader.ip, reader.peer
        else:
            ip, port = header.source
            peer = format_peer(socket.AF_INET6 if ":" in ip else socket.AF_INET, (ip, port))
        limit = self._config.limits.max_connections_per_ip
        if ip and limit and self._per_ip.get(ip, 0) >= limit:
            self._refuse_proxied(reader, peer, ip, limit)
            return CLOSE  # the reactor closes the reader; reader_closed() forgets it
        del self._readers[reader.fd]
        conn = self._start(reader.sock, ip, peer, reader.listener, proxy=reader.peer)
        self.reactor.replace(reader, conn)
        if self._edge:
            # Bytes behind the header are queued, and so may be the client's FIN: the
            # reader's events took the edges that announced them, and no new edge will
            # come. EPOLLRDHUP makes the connection read past a short read to EAGAIN or
            # EOF; with EPOLLIN alone it stopped at the payload and never saw the FIN.
            self.reactor.reschedule((conn.fd, EPOLLIN | select.EPOLLRDHUP))
        return reader.mask

    def _refuse_proxied(self, reader: HeaderReader, peer: str, ip: str, limit: int) -> None:
        """A proxied client over max_connections_per_ip: counted and warned as at accept."""
        self._log_unserved(peer, reader.fd, reader.opened_at, "limit", proxy=reader.peer)
        self._count_refused("max_connections_per_ip", limit, ip, proxy=reader.peer)

    def header_failed(self, reader: HeaderReader, reason: str, detail: str) -> None:
        """No valid header: counted, warned of at a bounded rate; the reader closes next."""
        self._header_errors.record(reason, self.reactor.now, log, proxy=reader.peer, detail=detail)
        self._log_unserved(reader.peer, reader.fd, reader.opened_at, "proxy_header", reason)

    def _sweep_readers(self) -> None:
        """Close the readers older than proxy.timeout (a new timeout applies to all).

        Readers are kept in the order they were accepted, so the sweep stops at the
        first one still in time: it costs one look per expired reader, not one per reader,
        and a finished header leaves nothing behind (a per-reader timer would stay in the
        heap until due, holding the reader: at 50,000 accepts/s that is 250,000 of them).
        """
        self._sweep_armed = False
        if self.handed_over:  # the next process times the headers out
            return
        timeout_s = self._config.proxy.timeout_s
        deadline = self.reactor.now - timeout_s
        expired = []
        for reader in self._readers.values():
            if reader.opened_at > deadline:
                break
            expired.append(reader)
        for reader in expired:
            self.header_failed(reader, "timeout", f"no complete header within {timeout_s}s")
            self.reactor.close(reader)
        if self._readers and not self._stopping:
            self._arm_sweep()

    def reader_closed(self, reader: HeaderReader) -> None:
        """Forget a reader whose socket was closed (failure, timeout, refusal, shutdown)."""
        if self._readers.get(reader.fd) is reader:
            del self._readers[reader.fd]
        if self._stopping and not self._conn_count and not self._readers:
            self._finish()

    def splice_failed(self, conn: Connection, events: int) -> None:
        """No pipe for a splice connection at its first read: a copying connection takes
        over its socket (nothing was read yet, so there is no state to move)."""
        self._pipes -= 1
        copy = self._copy_class(
            conn.sock, conn.ip, buf=self._read_buf, shared=self._shared, now=conn.opened_at
        )
        copy._peer = conn._peer
        copy.reason = conn.reason
        self._idle.remove(conn)
        self.reactor.replace(conn, copy)
        self._idle.add(copy)
        self.reactor.set_mask(
            copy, copy.begin_shutdown() if self._stopping else copy.on_event(events)
        )

    def _make_pipe(self) -> tuple[int, int, int] | None:
        """A pipe for a splice connection's first read, or None to copy instead (logged
        once per episode): a client is never dropped for want of a pipe."""
        try:
            pipe = make_pipe(self._config.buffers.read_size_bytes)
        except OSError as e:
            self._splice_unavailable(errno.errorcode.get(e.errno or 0, str(e)))
            return None
        if self._splice_fallback:
            self._splice_fallback = False
            log.info("splice_available")
        return pipe

    def _splice_unavailable(self, reason: str, **fields: Any) -> None:
        if not self._splice_fallback:
            self._splice_fallback = True
            log.warning(
                "splice_unavailable",
                reason=reason,
                fallback="copy",
                connections=self._conn_count,
                **fields,
            )

    def _refuse(self, sock: socket.socket, addr: Any, ip: str, limit: str, value: int) -> None:
        """Close a peer over a limit at once; warn at most every REFUSED_WARNING_EVERY_S."""
        self._log_unserved(format_peer(sock.family, addr), sock.fileno(), None, "limit")
        sock.close()
        self._count_refused(limit, value, ip or None)

    def _log_unserved(
        self,
        peer: str,
        fd: int,
        opened_at: float | None,
        reason: str,
        error: str | None = None,
        **fields: Any,
    ) -> None:
        """The connection_closed line of a peer closed before it was echoed to (refused
        at accept: opened_at None, or refused or failed while its PROXY header was read)."""
        if self._conn_log is not None:
            self._conn_log(
                "connection_closed",
                peer=peer,
                fd=fd,
                bytes_in=0,
                bytes_out=0,
                duration_s=0.0 if opened_at is None else round(self.reactor.now - opened_at, 3),
                reason=reason,
                error=error,
                **fields,
            )

    def _count_refused(self, limit: str, value: int, peer_ip: str | None, **fields: Any) -> None:
        """Count a refusal; warn at most every REFUSED_WARNING_EVERY_S, with how many."""
        now = self.reactor.now
        self.counters.count_refused(limit)
        self._refused_unlogged += 1
        if now - self._refused_logged_at >= REFUSED_WARNING_EVERY_S:
            log.warning(
                "connection_refused",
                limit=limit,
                value=value,
                peer_ip=peer_ip,
                **fields,
                refused=self._refused_unlogged,
            )
            self._refused_unlogged = 0
            self._refused_logged_at = now

    def _pause_accepting(self, listener: Listener, e: OSError) -> None:
        """Out of descriptors or memory: stop watching the listener for a while."""
        self.reactor.remove(listener)
        del self._listeners[listener.fd]
        self._paused[listener.fd] = listener
        if self._paused_since is None:  # once per episode
            self._paused_since = self.reactor.now
            log.warning(
                "accept_paused",
                address=listener.name,
                error=errno.errorcode.get(e.errno or 0),
                retry_s=ACCEPT_RETRY_S,
                connections=self._conn_count,
            )
        self.reactor.call_later(ACCEPT_RETRY_S, lambda: self._resume_accepting(listener))

    def _resume_accepting(self, listener: Listener) -> None:
        if self._paused.pop(listener.fd, None) is None or self._stopping:
            return
        self._add_listener(listener)

    # -- closing -------------------------------------------------------------------

    def _connections(self) -> list[Connection]:
        return [h for h in self.reactor.handlers() if isinstance(h, Connection)]

    def connection_closed(self, conn: Connection) -> None:
        """Account for a closed connection (Connection.close() calls this)."""
        fd = conn.fd
        self._conn_count -= 1
        proxy = self._proxies.pop(fd, None)
        if isinstance(conn, SpliceConnection):
            self._pipes -= 1
        self._idle.remove(conn)
        if conn.ip:
            left = self._per_ip[conn.ip] - 1
            if left:
                self._per_ip[conn.ip] = left
            else:
                del self._per_ip[conn.ip]
        self.counters.count_close(
            conn.reason or "error",
            self.reactor.now - conn.opened_at,
            conn.bytes_in,
            conn.bytes_out,
        )
        if self._conn_log is not None:
            self._conn_log(
                "connection_closed",
                peer=conn.peer,
                fd=fd,
                bytes_in=conn.bytes_in,
                bytes_out=conn.bytes_out,
                duration_s=round(self.reactor.now - conn.opened_at, 3),
                reason=conn.reason or "error",
                error=conn.error or None,
                **({"proxy": proxy} if proxy is not None else {}),
            )
        if self._stopping and not self._conn_count and not self._readers:
            self._finish()

    def _close(self, conn: Connection, reason: str) -> None:
        conn.reason = reason
        self.reactor.close(conn)

    def _close_everything(self) -> None:
        for reader in list(self._readers.values()):
            self.reactor.close(reader)
        for conn in self._connections():
            conn.discard_pending()
            self._close(conn, "shutdown")
        self._stop_metrics()
        for listener in self.listeners:
            self.reactor.close(listener)
        self._listeners.clear()
        self._paused.clear()
        self._udp.close_all()
        self.reactor.release()

    # -- timers --------------------------------------------------------------------

    def _start_timers(self) -> None:
        """The periodic work; each timer reads its interval from the current settings."""
        every = self.reactor.every
        every(lambda: self._idle.tick_s, self._sweep_idle)
        every(lambda: self._config.stats_interval_s or 1.0, self._periodic_stats)
        if self._notifier.enabled:
            every(lambda: STATUS_EVERY_S, self._send_status)
        watchdog_s = self._notifier.watchdog_interval_s()
        if watchdog_s:
            # From the loop itself, not a thread: a stuck loop stops pinging.
            every(lambda: watchdog_s, self._watchdog_ping)

    def _periodic_stats(self) -> None:
        if self._config.stats_interval_s > 0:
            self._log_stats()

    def _watchdog_ping(self) -> None:
        if self._config.watchdog:
            self._notifier.watchdog_ping()

    def _sweep_idle(self) -> None:
        self._expiring.extend(self._idle.expired(self.reactor.now))  # type: ignore[arg-type]
        self._close_expired()

    def _close_expired(self) -> None:
        """Close idle connections IDLE_CLOSES_PER_TURN at a time, polling in between: 20,000
        expiring at once held the loop for 175-360 ms when closed in one go."""
        if self.handed_over:  # the next process runs the idle timeout on
            return
        batch = self._expiring[-IDLE_CLOSES_PER_TURN:]
        del self._expiring[-IDLE_CLOSES_PER_TURN:]
        now = self.reactor.now
        for conn in batch:
            if conn.sock.fileno() < 0 or conn.idle_bucket is not None:  # closed, re-filed
                continue
            if conn.active_at + self._idle.timeout_s > now:  # woke up while it waited
                self._idle.add(conn)
            else:
                self._close(conn, "idle_timeout")
        if self._expiring:
            self.reactor.call_soon(self._close_expired)

    # -- signals -------------------------------------------------------------------

    def _on_stop_signal(self, signum: int) -> None:
        if self._stopping:
            if signum == signal.SIGINT:  # a second Ctrl-C: stop now
                self._force_stop("SIGINT")
            return
        self.stop(signal.Signals(signum).name)

    def stop(self, why: str) -> None:
        """Graceful stop: close listeners, echo what was received, FIN, then exit."""
        self._stopping = True
        timeout_s = self._config.shutdown_timeout_s
        log.info("shutdown_started", signal=why, connections=self._conn_count, timeout_s=timeout_s)
        self._notifier.stopping(f"stopping: draining {self._conn_count} connections")
        self._notifier.extend_timeout(timeout_s + 5.0)
        for listener in self.listeners:
            self.reactor.close(listener)
        self._listeners.clear()
        self._paused.clear()
        self._udp.close_all()  # nothing to drain: a datagram is answered at once or never
        for reader in list(self._readers.values()):  # nothing to echo yet: nothing to drain
            self.reactor.close(reader)
        self._stop_metrics()
        for conn in self._connections():
            self.reactor.set_mask(conn, conn.begin_shutdown())
        self.reactor.call_later(timeout_s, self._force_stop)
        if not self._conn_count:
            self._finish()

    def _force_stop(self, signal_name: str | None = None) -> None:
        """Close what is left, unsent output dropped: at shutdown_timeout or a second SIGINT."""
        if not self._done:
            left = self._conn_count
            for conn in self._connections():
                conn.discard_pending()
                self._close(conn, "shutdown")
            if left or signal_name:
                reason = "second_signal" if signal_name else "shutdown_timeout"
                log.warning("shutdown_forced", reason=reason, signal=signal_name, connections=left)
        self._finish()

    # -- the restart handoff (epolld/handoff.py) ---------------------------------

    def add_handoff_source(self, source: handoff.HandoffSource) -> None:
        """Something outside the reactor whose record travels too (the daemon's pidfile)."""
        self._handoff_sources.append(source)

    def _on_handoff_signal(self, signum: int) -> None:
        if self._stopping:
            log.warning("handoff_refused", reason="stopping already")
            return
        if not self._handoff_pending:  # after this batch: the state is then consistent
            self._handoff_pending = True
            self.reactor.call_soon(self._hand_over_on_signal)

    def _hand_over_on_signal(self) -> None:
        self._handoff_pending = False
        under_systemd = self._notifier.enabled
        try:
            destination: handoff.Destination = (
                handoff.FdStore(self._notifier, BARRIER_TIMEOUT_S)
                if under_systemd
                else handoff.Reexec()
            )
        except handoff.HandoffError as e:
            log.error("handoff_failed", reason=str(e), action="serve on")
            return
        if not self.hand_over(destination, listeners_travel=True) and under_systemd:
            # systemd is stopping us either way (and kills at TimeoutStopSec): a
            # graceful drain is the best left to offer the clients.
            self.stop("SIGUSR2")

    def hand_over(self, destination: handoff.Destination, *, listeners_travel: bool) -> bool:
        """Stop accepting, write every handler's record and send every descriptor to
        destination (systemd's store, a re-exec, a worker's supervisor). True once
        delivered: the loop then stops and lets go of its copies.

        Until the point of no return nothing is closed: a failure logs handoff_failed and
        the service goes on as before (False). Listeners stay behind when they are not
        this process's to hand over (a worker's belong to its supervisor).
        """
        signal_at = handoff.now_monotonic()
        steps: dict[str, float] = {}
        for listener in self.listeners:  # accept no more: the backlog waits for the next
            self.reactor.remove(listener)
        out = handoff.StateWriter(systemd_keeps_inherited=destination.keeps_inherited)
        left_behind: dict[str, int] = {}
        metrics_listener = self._metrics.listener if self._metrics is not None else None
        staying = set() if listeners_travel else {id(x) for x in self._listener_handlers()}
        for source in [*self.listeners, *self.reactor.handlers(), *self._handoff_sources]:
            contribute = getattr(source, "handoff_state", None)
            if id(source) in staying:
                continue
            if metrics_listener is not None and source is metrics_listener:
                # A Listener, but not one that accepts echo.
                record = metrics_listener.handoff_state(out)
                if record is not None:
                    out.add({**record, "kind": "metrics_listener"})
            elif contribute is not None:
                record = contribute(out)
                fd = getattr(source, "fd", -1)
                proxy = self._proxies.get(fd) if record is not None else None
                out.add({**record, "proxy": proxy} if proxy and record is not None else record)
            else:
                kind = type(source).__name__
                left_behind[kind] = left_behind.get(kind, 0) + 1
        counts = out.counts()
        conns = self._connections()
        log.info(
            "handoff_started",
            connections=counts.get("connection", 0),
            listeners=counts.get("listener", 0),
            paused=sum(1 for c in conns if not c.reading and not c.eof),
            half_closed=sum(1 for c in conns if c.eof),
            pending_bytes=sum(c.pending() for c in conns),
            records=counts,
            descriptors=len(out.fds),
            route=type(destination).__name__,
        )
        if left_behind:
            log.warning("handoff_left_behind", kinds=left_behind, reason="no handoff_state()")
        self._notifier.status(f"handing over {self._conn_count} connections")
        _step(steps, "collect", signal_at)
        meta = {
            "epolld": __version__,
            "pid": os.getpid(),
            "signal_at": signal_at,
            "config": config_mod.render_config(self._config),
            "config_source": self._config.source,
            # Totals travel, so that stats and metrics stay monotonic across restarts.
            "service": {
                "started_at": self._started_at,
                "counters": asdict(self.counters),
                "udp": {
                    name: getattr(self._udp.stats, name)
                    for name in ("received", "echoed", "icmp_errors", "dropped")
                },
            },
        }
        try:
            handoff.send(out, meta, destination, steps)
        except handoff.HandoffError as e:
            for listener in self.listeners:
                self._add_listener_again(listener)
            action = "drain" if self._notifier.enabled else "serve on"
            log.error("handoff_failed", reason=str(e), steps=steps, action=action)
            if not self._notifier.enabled:
                self._notifier.status(f"handoff failed, still serving: {e}")
            return False
        # The next process holds everything now: exit without a FIN or an unlinked
        # socket file.
        self.handed_over = True
        self.reactor.stop()
        return True

    def _listener_handlers(self) -> list[object]:
        """The handlers that are listening sockets (TCP and Unix, UDP, metrics)."""
        handlers: list[object] = [*self.listeners, *self._udp.endpoints()]
        if self._metrics is not None:
            handlers.append(self._metrics.listener)
        return handlers

    def _add_listener_again(self, listener: Listener) -> None:
        if listener.fd in self._paused:
            return  # its EMFILE timer re-adds it
        self.reactor.add(listener)

    def _let_go(self) -> None:
        """After a handoff: close our copies only. Every socket lives on in the store or
        in flight, so no FIN is sent and no Unix socket file is removed."""
        for handler in self.reactor.handlers():
            self.reactor.remove(handler)
            if isinstance(handler, SpliceConnection) and handler.pipe_r >= 0:
                os.close(handler.pipe_r)
                os.close(handler.pipe_w)
            sock = getattr(handler, "sock", None)
            if isinstance(sock, socket.socket):
                sock.close()
        for listener in self.listeners:
            listener.sock.close()
        self._listeners.clear()
        self._paused.clear()
        self.reactor.release()

    def restore_handoff(
        self,
        state: handoff.State,
        more: dict[str, handoff.Restorer] | None = None,
        *,
        started_at: float | None = None,
        received_s: float = 0.0,
    ) -> dict[str, int]:
        """Take over what the previous process handed over: listeners, connections (with
        their counters and pending output), the global counters. Returns the counts."""
        restore_at = handoff.now_monotonic()
        document = state.document
        totals = document.get("service", {})
        if totals:
            self._started_at = float(totals["started_at"])
            self._restore_counters(totals.get("counters") or {})
            for name, value in (totals.get("udp") or {}).items():
                if hasattr(self._udp.stats, name):
                    setattr(self._udp.stats, name, value)
        restorers: dict[str, handoff.Restorer] = {
            "listener": self._restore_listener,
            "connection": self._restore_connection,
            "metrics_listener": self._restore_metrics_listener,
            "udp": self._restore_udp,
            "proxy_header": self._restore_header_reader,
            "tls_closing": self._restore_tls_closing,
            **(more or {}),
        }
        counts = handoff.restore(state, restorers)
        steps = dict(document.get("steps", {}))
        signal_at = document.get("signal_at")
        if started_at is not None and isinstance(signal_at, float):
            # The old process's exit (or execv) and this one's interpreter start-up.
            steps["startup"] = round(started_at - signal_at - sum(steps.values()), 4)
        steps["receive"] = round(received_s, 4)
        self._restored_at = handoff.now_monotonic()
        steps["restore"] = round(self._restored_at - restore_at, 4)
        self._restored = {
            "counts": counts,
            "old_version": document.get("epolld"),
            "old_pid": document.get("pid"),
            "signal_at": document.get("signal_at"),
            "steps": steps,
        }
        return counts

    def _restore_counters(self, saved: dict[str, Any]) -> None:
        """Carry on from the previous process's totals (in place: the metrics endpoint
        reads this very object). A field this version does not know is ignored."""
        counters = self.counters
        for name, value in saved.items():
            if name in ("durations", "tls_handshake_durations") and isinstance(value, dict):
                setattr(counters, name, DurationHistogram(**value))
            elif hasattr(counters, name):
                setattr(counters, name, value)

    def reconcile_after_handoff(self, previous: Config) -> None:
        """Bind what the configuration now lists and the old process did not, and close
        the handed-over listeners it no longer lists (a reload's rules); the metrics
        listener stays if metrics.listen still names it.

        Raises:
            BindError: a new address could not be bound; the handed-over listeners stay.
        """
        plan = self.listener_set.plan(previous, self._config)
        self._apply_listeners(plan, self._config, before_start=True)

    def _restore_listener(self, record: dict[str, Any], state: handoff.State) -> None:
        listener = Listener.from_handoff(record, state)
        self.listener_set.add(listener)
        self._serve_kind[kind_of(listener)](listener)

    def _restore_tls_closing(self, record: dict[str, Any], state: handoff.State) -> None:
        """A TLS connection the previous process echoed and closed: send its last bytes."""
        self._tls_serving(self._config).restore_closing(record, state)

    def _restore_header_reader(self, record: dict[str, Any], state: handoff.State) -> None:
        """A PROXY header half read: the reader goes on (its timeout from the accept)."""
        sock = socket.socket(fileno=state.take_fd(record["fd"]))
        sock.setblocking(False)
        reader = HeaderReader(
            sock,
            sys.intern(str(record["ip"])),
            str(record["peer"]),
            listener=str(record["listener"]),
            mask=self._conn_class.INITIAL_MASK,
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
        self._readers[reader.fd] = reader
        self.reactor.add(reader)
        if not self._sweep_armed:
            self._arm_sweep()

    def _restore_udp(self, record: dict[str, Any], state: handoff.State) -> None:
        listener = Listener.from_handoff(record, state)
        self.listener_set.add(listener)
        self._udp.add(listener)

    def _restore_metrics_listener(self, record: dict[str, Any], state: handoff.State) -> None:
        listener = Listener.from_handoff(record, state)
        self._stop_metrics()
        self._metrics = self._serve_metrics(listener)

    def _restore_connection(self, record: dict[str, Any], state: handoff.State) -> None:
        splice = record.get("io") == "splice"
        cls = connection_class(bool(record["edge"]), splice)
        conn = cls.from_handoff(record, state, buf=self._read_buf, shared=self._shared)
        if record.get("proxy"):
            self._proxies[conn.fd] = str(record["proxy"])
        if conn.ip:
            conn.ip = sys.intern(conn.ip)
            self._per_ip[conn.ip] = self._per_ip.get(conn.ip, 0) + 1
        self._conn_count += 1
        if splice:
            self._pipes += 1
        self.reactor.add(conn)
        self._idle.add(conn)

    def _log_handoff_complete(self, restored: dict[str, Any]) -> None:
        now = handoff.now_monotonic()
        signal_at = restored.get("signal_at")
        steps = restored["steps"]
        steps["ready"] = round(now - self._restored_at, 4)
        counts = restored["counts"]
        log.info(
            "handoff_complete",
            connections=counts.get("connection", 0),
            listeners=counts.get("listener", 0),
            records=counts,
            old_version=restored["old_version"],
            new_version=__version__,
            old_pid=restored["old_pid"],
            duration_s=round(now - signal_at, 4) if isinstance(signal_at, float) else None,
            steps=steps,
        )
        self._notifier.status(
            f"{self._status_line()}; took over {counts.get('connection', 0)} connections "
            f"from {restored['old_version']}"
        )

    def _on_reload_signal(self, signum: int) -> None:
        self.reload()

    def reload(self) -> str | None:
        """Load the configuration from the reload source and apply it, or keep the old one
        (SIGHUP; a worker process calls it when its supervisor sends a configuration).

        Returns:
            None when applied (or nothing to do), else why the old configuration stays.
        """
        if self._stopping or self._reload_source is None:
            return None
        self._notifier.reloading()
        try:
            self.apply(self._reload_source())
        except EpolldError as e:  # the old configuration stays in force
            self.counters.count_reload(ok=False)
            log.error("config_reload_failed", error=str(e))
            self._notifier.ready(f"reload failed, running on the previous configuration: {e}")
            return str(e)
        self.counters.count_reload(ok=True)
        self._notifier.ready(self._status_line())
        return None

    def apply(self, new: Config) -> None:
        """Switch to a new configuration as one step, or raise and change nothing.

        Raises:
            BindError: a new address could not be bound; the old listeners stay.
        """
        old = self._config
        # Certificates and keys are read again first: a file that cannot be used now
        # refuses the whole reload (ConfigError) before anything changed.
        contexts = None
        if self._tls is not None or any(a.tls for a in new.listen):
            contexts = self._tls_serving(new).prepare(new)
        plan = self.listener_set.plan(old, new)
        if contexts is not None:
            self._tls_serving(new).configure(new, contexts)
        self._apply_listeners(plan, new)
        # Logged before a new log level applies, so that it is the old level that decides.
        log.info(
            "config_reloaded",
            changes={
                k: [_jsonable(a), _jsonable(b)]
                for k, (a, b) in config_mod.changes(old, new).items()
            },
        )
        if new.logging != old.logging:
            logsetup.configure(new.logging.level, new.logging.format)
        self._apply_settings(new)
        self._udp.configure(new.udp, edge=self._edge)
        if new.trigger != old.trigger:
            # Open connections keep the mode they were registered in; listeners switch,
            # or an edge-triggered listener could sit on a backlog the level code leaves.
            for listener in self._listeners.values():
                if listener.shared:  # epoll_ctl(MOD) refuses EPOLLEXCLUSIVE: register anew
                    self.reactor.remove(listener)
                    listener.mask = self._listener_mask(listener)
                    self.reactor.add(listener)
                else:
                    self.reactor.set_mask(listener, self._listen_mask)
            for listener in self._paused.values():
                listener.mask = self._listener_mask(listener)
        if new.buffers.read_size_bytes != old.buffers.read_size_bytes:
            for conn in self._connections():
                conn.buf = self._read_buf
        if new.limits.idle_timeout_s != old.limits.idle_timeout_s:
            self._idle.retime(new.limits.idle_timeout_s, self._connections())

    def _apply_listeners(self, plan: Plan, config: Config, *, before_start: bool = False) -> None:
        """Commit a plan of the listener set: removed sockets leave the reactor, new ones
        are served, a moved metrics endpoint serves on its new socket (announced by
        _started() when this comes before the loop runs)."""
        self.listener_set.commit(plan, self._release_listener, self._release_metrics)
        for listener in plan.new_listeners():
            self._serve_kind[kind_of(listener)](listener)
            log.info("listening", address=listener.name, fd=listener.fd, trigger=config.trigger)
        if plan.metrics is not None:
            self._metrics = self._serve_metrics(plan.metrics)
            if not before_start:
                log.info("metrics_listening", address=plan.metrics.name)
        if self._tls is not None or any(lst.tls for lst in self.listeners):
            # Followed listeners may have turned TLS on or off, or changed certificates.
            self._tls_serving(config).refresh(self.listeners)

    def _release_listener(self, listener: Listener) -> None:
        """Stop serving a removed listener and close it (its connections stay)."""
        if listener.is_udp:
            self._udp.remove(listener)
        else:
            self._listeners.pop(listener.fd, None)
            self._paused.pop(listener.fd, None)
            self.reactor.close(listener)

    def _release_metrics(self, listener: Listener) -> None:
        if self._metrics is not None and self._metrics.listener is listener:
            self._stop_metrics()
        else:
            listener.close()

    # -- metrics -------------------------------------------------------------------

    def _serve_metrics(self, listener: Listener) -> MetricsEndpoint:
        from epolld.observability import metrics

        if self._metrics_app is None:  # one registry for the process, across reloads
            self._metrics_app = metrics.MetricsApp(self.snapshot)
        self.listener_set.metrics = listener
        return metrics.MetricsEndpoint(self.reactor, listener, self._metrics_app)

    def _stop_metrics(self) -> None:
        if self._metrics is not None:
            log.info("metrics_closed", address=self._metrics.listener.name)
            self._metrics.close()
            self._metrics = None
            self.listener_set.metrics = None

    def snapshot(self) -> Snapshot:
        """The counters and the live values, for the metrics endpoint (once per scrape)."""
        bytes_in, bytes_out = self._byte_totals()
        return Snapshot(
            counters=self.counters,
            connections=self._conn_count,
            bytes_received=bytes_in,
            bytes_sent=bytes_out,
            listeners=len(self._listeners),
            accept_paused=bool(self._paused),
            # Once UDP has served, its series stay (counters must not vanish on a reload).
            udp=self._udp.stats if len(self._udp) or self._udp.stats.received else None,
            proxy_header_errors=dict(self._header_errors.counts)
            if any(lst.proxy_protocol for lst in self.listeners)
            else None,
            tls_certificates=self._tls.certificates() if self._tls is not None else None,
        )

    # -- reporting -----------------------------------------------------------------

    def _byte_totals(self) -> tuple[int, int]:
        """Bytes in and out so far: closed connections' totals plus the open ones'."""
        conns = self._connections()
        return (
            self.counters.bytes_received + sum(c.bytes_in for c in conns),
            self.counters.bytes_sent + sum(c.bytes_out for c in conns),
        )

    def stats(self) -> dict[str, Any]:
        """Live counters."""
        bytes_in, bytes_out = self._byte_totals()
        return {
            "connections": self._conn_count,
            "accepted": self.counters.accepted,
            "refused": sum(self.counters.refused.values()),
            "bytes_in": bytes_in,
            "bytes_out": bytes_out,
            "uptime_s": round(self.reactor.now - self._started_at, 1),
            "listeners": len(self._listeners),
            "accept_paused": bool(self._paused),
            "splice_connections": self._pipes,
            **self._udp.counters(),
            "proxy_reading": len(self._readers),
            "proxy_headers_read": self._headers_read,
            "proxy_header_errors": dict(self._header_errors.counts),
        }

    def _on_stats_signal(self, signum: int) -> None:
        self._log_stats()

    def _log_stats(self) -> None:
        log.info("stats", **self.stats())

    def _status_line(self) -> str:
        names = " ".join(lst.name for lst in [*self.listeners, *self._udp.listeners])
        now = time.monotonic()
        total = self._byte_totals()[1]
        then, before = self._status_bytes
        self._status_bytes = (now, total)
        rate = (total - before) / (now - then) / 1e6 if now > then else 0.0
        line = f"echoing on {names}; {self._conn_count} connections; {rate:.1f} MB/s"
        if len(self._udp):
            counts = self._udp.stats
            dropped = sum(counts.dropped.values())
            line += f"; {counts.echoed} datagrams echoed, {dropped} dropped"
        return line

    def _send_status(self) -> None:
        self._notifier.status(self._status_line())


def _step(steps: dict[str, float], name: str, since: float) -> float:
    now = handoff.now_monotonic()
    steps[name] = round(now - since, 4)
    return now


def _jsonable(value: object) -> object:
    return value if isinstance(value, (str, int, float, bool, type(None), list)) else str(value)
