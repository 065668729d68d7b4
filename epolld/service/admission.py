"""Who gets in, and who is in: the echo listeners, accepting, the limits and refusals, the
connection class (copy or splice, with its fallback to copying), and the accounting of
every open connection until it closes. The service's connections report here
(`SharedSettings.owner`).

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
import socket
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from epolld.config import Config, Faults
from epolld.core.counters import FAULT_KINDS, Counters
from epolld.core.idle import IdleTimer
from epolld.core.loop import Reactor
from epolld.listening.sockets import Listener
from epolld.observability import logsetup
from epolld.services.stream import open_service
from epolld.tcp.connection import EPOLLIN, EPOLLOUT, Connection, SharedSettings, format_peer
from epolld.tcp.splice import SpliceConnection, connection_class, make_pipe

if TYPE_CHECKING:
    import ssl

    from epolld.faults.stream import FaultPlan
    from epolld.service.proxied import Proxied
    from epolld.tcp.proxy import ProxyHeader
    from epolld.tls.serving import TlsServing  # imports ssl: only with a TLS listener

log = structlog.get_logger("epolld")

ACCEPT_RETRY_S = 0.5  # pause after EMFILE & co. before accepting again
REFUSED_WARNING_EVERY_S = 10.0  # at most one "connection_refused" warning per this
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# The peer went away between the handshake and accept(); nothing to do (accept(2)).
ACCEPT_IGNORED_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})


class Admission:
    """Accept on the echo listeners within the limits, and account for each connection.

    Args:
        reactor: the process's reactor.
        config: the configuration in force (`configure()` switches it).
        counters: the totals (accepted, refused, closed) this part adds to.
        idle: the idle timer every open connection is filed in.

    The wiring sets `proxied` (the PROXY header readers, which take a proxy listener's
    peers first) and `on_drained` (called when a stop finds nothing left open), and
    `tls` once a TLS listener is served (its listeners' connections are TLS ones).
    """

    proxied: Proxied
    on_drained: Callable[[], None]

    def __init__(
        self, reactor: Reactor, config: Config, counters: Counters, idle: IdleTimer
    ) -> None:
        self.reactor = reactor
        self.counters = counters
        self._idle = idle
        # The reactor's handler map holds the connections; admission only counts them
        # (a second dict would cost ~50 bytes per connection).
        self.conn_count = 0
        self.registered: dict[int, Listener] = {}  # listeners registered with the reactor
        self.paused: dict[int, Listener] = {}  # listeners waiting out EMFILE & co.
        self._accept_queue: list[Listener] = []  # ready listeners, served after the batch
        self.per_ip: dict[str, int] = {}
        self.stopping = False  # no more admitting: the open connections drain
        self.handed_over = False  # everything is the next process's: touch nothing
        self._paused_since: float | None = None  # the current EMFILE episode
        self._splice_fallback = False  # no pipe to be had: new connections copy instead
        self.pipes = 0  # open splice connections, each holding a pipe (2 fds)
        self.tls: TlsServing | None = None  # tls/serving.py: made with the first TLS listener
        # Listener name -> its service, for the listeners that serve other than echo
        # (services/); looked up once per accept, never per event.
        self.services: dict[str, str] = {}
        # What the process holds before any client (stdio, epoll, listeners, ...), plus
        # room for log files and the pidfile.
        self._base_fds = len(os.listdir("/proc/self/fd")) + 16
        self._refused_unlogged = 0
        self._refused_logged_at = -REFUSED_WARNING_EVERY_S
        self.read_buf = memoryview(bytearray())  # sized by configure()
        self.shared = SharedSettings(
            high_water=config.buffers.high_water_bytes,
            low_water=config.buffers.low_water_bytes,
            reschedule=reactor.reschedule,
            owner=self,
            make_pipe=self._make_pipe,
        )
        self._apply_settings(config)

    # -- settings ----------------------------------------------------------------

    def _apply_settings(self, config: Config) -> None:
        """Cache what the hot paths read, so that they read plain attributes."""
        self._config = config
        self.edge = config.trigger == "edge"
        self._listen_mask = EPOLLIN | select.EPOLLET if self.edge else EPOLLIN
        self.reactor.trace = config.logging.level == "trace"
        self._splice = config.io == "splice"
        # Fault listeners (faults/): a plan per listener's faults, made at its first
        # connection; a reload starts afresh, open connections keep the plan they have.
        self._faults = any(a.faults is not None and not a.is_udp for a in config.listen)
        self._fault_plans: dict[Faults, FaultPlan] = {}
        if any(a.faults is not None for a in config.listen):  # every series from the start
            for kind in FAULT_KINDS:
                self.counters.faults.setdefault(kind, 0)
        self.conn_class = connection_class(self.edge, self._splice)
        self._copy_class = connection_class(self.edge, splice=False)
        self.shared.high_water = config.buffers.high_water_bytes
        self.shared.low_water = config.buffers.low_water_bytes
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self._pipe_budget = max(0, (nofile - self._base_fds - config.limits.max_connections) // 2)
        if len(self.read_buf) != config.buffers.read_size_bytes:
            # Anonymous mmap, not bytearray: its pages are resident only once a read
            # reaches them (bytearray() zero-fills, 256 KiB resident from the start).
            self.read_buf = memoryview(mmap.mmap(-1, config.buffers.read_size_bytes))
        # Decided once per configuration, not per connection: the log call or None.
        if config.logging.connections:
            self.conn_log: Callable[..., Any] | None = log.info
        elif logsetup.enabled("debug"):
            self.conn_log = log.debug
        else:
            self.conn_log = None
        self.shared.name_peers = self.conn_log is not None

    def configure(self, new: Config) -> None:
        """A reload: new settings; the listeners switch trigger, open connections keep
        theirs but read into the new buffer."""
        old = self._config
        self._apply_settings(new)
        if new.trigger != old.trigger:
            # Open connections keep the mode they were registered in; listeners switch,
            # or an edge-triggered listener could sit on a backlog the level code leaves.
            for listener in self.registered.values():
                if listener.shared:  # epoll_ctl(MOD) refuses EPOLLEXCLUSIVE: register anew
                    self.reactor.remove(listener)
                    listener.mask = self._listener_mask(listener)
                    self.reactor.add(listener)
                else:
                    self.reactor.set_mask(listener, self._listen_mask)
            for listener in self.paused.values():
                listener.mask = self._listener_mask(listener)
        if new.buffers.read_size_bytes != old.buffers.read_size_bytes:
            for conn in self.connections():
                conn.buf = self.read_buf
        self._note_services()

    @property
    def listeners(self) -> list[Listener]:
        return [*self.registered.values(), *self.paused.values()]

    # -- accepting -----------------------------------------------------------------

    def add_listener(self, listener: Listener) -> None:
        listener.mask = self._listener_mask(listener)
        listener.on_ready = self._listener_ready
        self.registered[listener.fd] = listener
        self.reactor.add(listener)
        self._note_services()

    def _note_services(self) -> None:
        """Which listeners serve discard, chargen or info (a reload may change it: new
        connections get the new service)."""
        self.services = {
            lst.name: lst.address.service
            for lst in self.listeners
            if lst.address is not None and lst.address.service != "echo"
        }

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
            if listener.fd in self.registered:  # not paused or closed meanwhile
                self._accept(listener)

    def _accept(self, listener: Listener) -> None:
        """Accept until EAGAIN, at most one backlog's worth per wakeup."""
        limits = self._config.limits
        now = self.reactor.now
        readers = self.proxied.readers
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
            if self.conn_count + len(readers) >= limits.max_connections:
                self._refuse(sock, addr, ip, "max_connections", limits.max_connections)
                continue
            if listener.proxy_protocol:  # per-IP limits wait for the client's address
                self.proxied.read_header(sock, addr, ip, listener)
                continue
            if ip and limits.max_connections_per_ip:
                count = self.per_ip.get(ip, 0)
                if count >= limits.max_connections_per_ip:
                    self._refuse(
                        sock, addr, ip, "max_connections_per_ip", limits.max_connections_per_ip
                    )
                    continue
            self._open(sock, addr, ip, listener)
        if self.edge:  # the budget ran out before EAGAIN: no new edge will say so
            self.reactor.reschedule((listener.fd, EPOLLIN))

    def _open(self, sock: socket.socket, addr: Any, ip: str, listener: Listener) -> None:
        sock.setblocking(False)
        peer: str | None = listener.name
        if ip:
            # Echo is request/response: Nagle would hold back the tail of every reply.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # Worked out now only if it will be logged; else on first use (repr).
            peer = format_peer(sock.family, addr) if self.conn_log is not None else None
        self.start(sock, ip, peer, listener.name)

    def start(
        self,
        sock: socket.socket,
        ip: str,
        peer: str | None,
        listener: str,
        proxy: str = "",
        header: ProxyHeader | None = None,
    ) -> Connection:
        """Make the Connection for an accepted socket; register it unless it takes over
        from a PROXY header reader (proxy: that reader's peer, header: what it read),
        which the caller replaces."""
        if ip:
            ip = sys.intern(ip)  # one string per address, not one per connection
            self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        context = self.tls.context_for(listener) if self.tls is not None else None
        service = self.services.get(listener) if self.services else None
        plan = self._fault_plan(listener) if self._faults else None
        conn: Connection
        if plan is not None:
            conn = self._start_faulty(plan, service, sock, ip, peer, listener, context, header)
        elif service is None:
            conn = self._make_echo(sock, ip, peer, context)
        else:
            conn = self._start_service(service, sock, ip, peer, listener, context, header)
        self.conn_count += 1
        if not proxy:
            self.reactor.add(conn)
        self._idle.add(conn)
        self.counters.accepted += 1
        if self.conn_log is not None:
            self.conn_log(
                "connection_opened",
                peer=conn.peer,
                fd=conn.fd,
                listener=listener,
                io="splice" if isinstance(conn, SpliceConnection) else "copy",
                **({"proxy": proxy} if proxy else {}),
                **({"faults": plan.faults.active()} if plan is not None else {}),
                **({"tls": True} if context is not None else {}),
                **({"service": service} if service is not None else {}),
            )
        return conn

    def _make_echo(
        self, sock: socket.socket, ip: str, peer: str | None, context: ssl.SSLContext | None
    ) -> Connection:
        """The echo connection: TLS, or plain in the class for the trigger and io mode."""
        cls = self.conn_class
        if self._splice and context is None:  # splice cannot carry TLS (no kernel TLS)
            # Pipes stay within a budget that leaves one descriptor for each of
            # max_connections: otherwise splice connections (3 fds each) would use up
            # RLIMIT_NOFILE and later clients would wait in the backlog instead of being
            # served by copying.
            if self.pipes < self._pipe_budget:
                self.pipes += 1
            else:
                self._splice_unavailable("descriptor budget", budget=self._pipe_budget)
                cls = self._copy_class
        now = self.reactor.now
        if context is not None and self.tls is not None:
            return self.tls.open(
                context,
                sock,
                ip,
                buf=self.read_buf,
                shared=self.shared,
                now=now,
                peer=peer,
                edge=self.edge,
            )
        return cls(sock, ip, buf=self.read_buf, shared=self.shared, now=now, peer=peer)

    def _start_service(
        self,
        service: str,
        sock: socket.socket,
        ip: str,
        peer: str | None,
        listener: str,
        context: ssl.SSLContext | None,
        header: ProxyHeader | None,
    ) -> Connection:
        """A discard, chargen or info connection (services/); it copies whatever io
        says, and starts at once (info does not wait for the client to send)."""
        buf, shared, now = self.read_buf, self.shared, self.reactor.now
        if context is not None and self.tls is not None:
            from epolld.services.tls import open_tls_service

            conn: Connection = open_tls_service(
                self.tls, service, context, sock, ip, peer=peer, edge=self.edge,
                listener=listener, header=header, buf=buf, shared=shared, now=now,
            )  # fmt: skip
        else:
            conn = open_service(
                service, sock, ip, peer=peer, edge=self.edge, listener=listener,
                header=header, buf=buf, shared=shared, now=now,
            )  # fmt: skip
        # Chargen and info start sending without waiting for an event the client causes.
        self.reactor.reschedule((conn.fd, EPOLLOUT))
        return conn

    def _start_faulty(
        self,
        plan: FaultPlan,
        service: str | None,
        sock: socket.socket,
        ip: str,
        peer: str | None,
        listener: str,
        context: ssl.SSLContext | None,
        header: ProxyHeader | None,
    ) -> Connection:
        """A fault listener's connection (faults/): echo or a service, plain or TLS. It
        copies whatever io says."""
        buf, shared, now = self.read_buf, self.shared, self.reactor.now
        if service is not None and context is not None and self.tls is not None:
            from epolld.faults.tls_services import open_faulty_tls_service

            conn: Connection = open_faulty_tls_service(
                plan, self.tls, service, context, sock, ip, peer=peer, edge=self.edge,
                listener=listener, header=header, buf=buf, shared=shared, now=now,
            )  # fmt: skip
            return conn
        if service is not None:
            from epolld.faults.services import open_faulty_service

            conn = open_faulty_service(
                plan, service, sock, ip, peer=peer, edge=self.edge, listener=listener,
                header=header, buf=buf, shared=shared, now=now,
            )  # fmt: skip
            self.reactor.reschedule((conn.fd, EPOLLOUT))  # chargen and info start at once
            return conn
        if context is not None and self.tls is not None:
            from epolld.faults.tls import FaultyTlsConnection

            tls = self.tls.open(
                context, sock, ip, buf=buf, shared=shared, now=now, peer=peer, edge=self.edge,
                cls=FaultyTlsConnection,
            )  # fmt: skip
            assert isinstance(tls, FaultyTlsConnection)
            tls.attach(plan, now)
            return tls
        return plan.open(sock, ip, buf=buf, shared=shared, now=now, peer=peer, edge=self.edge)

    def _fault_plan(self, name: str) -> FaultPlan | None:
        """The plan of the faults of the listener called name (the file's current entry:
        listening.sockets.follow() keeps it), or None. Once per connection, never per event."""
        for listener in self.listeners:
            if listener.name == name:
                faults = listener.address.faults if listener.address is not None else None
                break
        else:
            return None
        if faults is None:
            return None
        plan = self._fault_plans.get(faults)
        if plan is None:
            import random

            from epolld.faults.stream import FaultPlan  # only with a fault listener

            plan = FaultPlan(faults, self.reactor, self.counters.faults, random.Random())
            self._fault_plans[faults] = plan
        return plan

    def adopt(self, conn: Connection, splice: bool) -> None:
        """A connection the previous process handed over: counted and served as accepted."""
        if conn.ip:
            conn.ip = sys.intern(conn.ip)
            self.per_ip[conn.ip] = self.per_ip.get(conn.ip, 0) + 1
        self.conn_count += 1
        if splice:
            self.pipes += 1
        self.reactor.add(conn)
        self._idle.add(conn)

    def splice_failed(self, conn: Connection, events: int) -> None:
        """No pipe for a splice connection at its first read: a copying connection takes
        over its socket (nothing was read yet, so there is no state to move)."""
        self.pipes -= 1
        copy = self._copy_class(
            conn.sock, conn.ip, buf=self.read_buf, shared=self.shared, now=conn.opened_at
        )
        copy._peer = conn._peer
        copy.reason = conn.reason
        self._idle.remove(conn)
        self.reactor.replace(conn, copy)
        self._idle.add(copy)
        self.reactor.set_mask(
            copy, copy.begin_shutdown() if self.stopping else copy.on_event(events)
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
                connections=self.conn_count,
                **fields,
            )

    # -- refusing ------------------------------------------------------------------

    def _refuse(self, sock: socket.socket, addr: Any, ip: str, limit: str, value: int) -> None:
        """Close a peer over a limit at once; warn at most every REFUSED_WARNING_EVERY_S."""
        self.log_unserved(format_peer(sock.family, addr), sock.fileno(), None, "limit")
        sock.close()
        self.count_refused(limit, value, ip or None)

    def log_unserved(
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
        if self.conn_log is not None:
            self.conn_log(
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

    def count_refused(self, limit: str, value: int, peer_ip: str | None, **fields: Any) -> None:
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
        del self.registered[listener.fd]
        self.paused[listener.fd] = listener
        if self._paused_since is None:  # once per episode
            self._paused_since = self.reactor.now
            log.warning(
                "accept_paused",
                address=listener.name,
                error=errno.errorcode.get(e.errno or 0),
                retry_s=ACCEPT_RETRY_S,
                connections=self.conn_count,
            )
        self.reactor.call_later(ACCEPT_RETRY_S, lambda: self._resume_accepting(listener))

    def _resume_accepting(self, listener: Listener) -> None:
        if self.paused.pop(listener.fd, None) is None or self.stopping:
            return
        self.add_listener(listener)

    def release_listener(self, listener: Listener) -> None:
        """Stop serving a removed TCP or Unix listener and close it (its connections stay)."""
        self.registered.pop(listener.fd, None)
        self.paused.pop(listener.fd, None)
        self.reactor.close(listener)

    def close_listeners(self) -> None:
        """Accept no more (a stop, the end): every echo listener closes."""
        for listener in self.listeners:
            self.reactor.close(listener)
        self.registered.clear()
        self.paused.clear()

    def let_go_listeners(self) -> None:
        """After a handoff: close our copies only (no unlinked socket file)."""
        for listener in self.listeners:
            listener.sock.close()
        self.registered.clear()
        self.paused.clear()

    def reregister(self, listener: Listener) -> None:
        """Back in the reactor after a failed handoff took it out (unless it is paused:
        its EMFILE timer re-adds it)."""
        if listener.fd in self.paused:
            return
        self.reactor.add(listener)

    # -- closing -------------------------------------------------------------------

    def connections(self) -> list[Connection]:
        return [h for h in self.reactor.handlers() if isinstance(h, Connection)]

    def connection_closed(self, conn: Connection) -> None:
        """Account for a closed connection (Connection.close() calls this)."""
        fd = conn.fd
        self.conn_count -= 1
        proxy = self.proxied.proxies.pop(fd, None)
        if isinstance(conn, SpliceConnection):
            self.pipes -= 1
        self._idle.remove(conn)
        if conn.ip:
            left = self.per_ip[conn.ip] - 1
            if left:
                self.per_ip[conn.ip] = left
            else:
                del self.per_ip[conn.ip]
        self.counters.count_close(
            conn.reason or "error",
            self.reactor.now - conn.opened_at,
            conn.bytes_in,
            conn.bytes_out,
        )
        service = getattr(conn, "SERVICE", None)  # services/ connections only
        if service is not None:
            self.counters.count_service(service, "tcp", conn.bytes_in, conn.bytes_out)
        if self.conn_log is not None:
            self.conn_log(
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
        if self.stopping and not self.conn_count and not self.proxied.readers:
            self.on_drained()

    def close(self, conn: Connection, reason: str) -> None:
        conn.reason = reason
        self.reactor.close(conn)
