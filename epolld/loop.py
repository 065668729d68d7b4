"""The event loop: select.epoll, the fd map, signals, timers, limits, shutdown.

Some facts about epoll that shape this file:

- HUP and ERR are reported whatever the mask asks for; a level-triggered HUP
  that is not acted on makes epoll_wait() return at once, forever. Connections
  treat them as "read and write now" and close on the failure (selectors.py).
- After a peer's shutdown(SHUT_WR), level-triggered EPOLLIN|EPOLLRDHUP stay set:
  a connection that saw EOF stops asking for EPOLLIN, or the loop spins.
- The fd is the only key epoll gives back, and accept() reuses the lowest free
  fd number. Listeners are therefore served after the connection events of a
  batch: an fd closed earlier in the batch cannot be handed to a new peer
  while events meant for the old one are still being dispatched.
- Accepting at EMFILE/ENFILE/ENOBUFS/ENOMEM leaves the connection in the
  backlog, so a level-triggered listener reports it again at once (381,189
  wakeups in 1 s, measured): the listener is unregistered and re-armed after
  ACCEPT_RETRY_S (nginx waits 500 ms, asyncio 1 s; bpo-27906).
- A signal handler alone does not wake epoll_wait(): PEP 475 retries the call.
  signal.set_wakeup_fd() writes the signal number to a socketpair that epoll
  watches, and the numbers are read back from it.
- Edge mode registers each connection once (EPOLLIN|EPOLLOUT|EPOLLRDHUP|EPOLLET)
  and never calls epoll_ctl again; work that no new edge will announce (a read
  budget used up, reading resumed after backpressure) is queued as a synthetic
  event for the next turn, which then polls without waiting.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import os
import resource
import select
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

import structlog

from epolld import config as config_mod
from epolld import listeners as listeners_mod
from epolld import logsetup
from epolld.config import Config, ListenAddress
from epolld.connection import CLOSE, EPOLLIN, Connection
from epolld.errors import BindError, EpolldError
from epolld.idle import IdleTimer
from epolld.listeners import Listener
from epolld.splice import SpliceConnection, make_pipe
from epolld.systemd import Notifier

log = structlog.get_logger("epolld")

ACCEPT_RETRY_S = 0.5  # pause after EMFILE & co. before accepting again
REFUSED_WARNING_EVERY_S = 10.0  # at most one "connection_refused" warning per this
STATUS_EVERY_S = 5.0  # STATUS= refresh for systemctl status
MAX_EVENTS = 1024  # per epoll_wait(); a larger batch only delays timers
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# The peer went away between the handshake and accept(); nothing to do (accept(2)).
ACCEPT_IGNORED_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})
EPOLL_FLAG_NAMES = [
    (getattr(select, name), name)
    for name in ("EPOLLIN", "EPOLLPRI", "EPOLLOUT", "EPOLLERR", "EPOLLHUP", "EPOLLRDHUP")
]


def describe_events(ev: int) -> str:
    """Decode an epoll event mask: 0x2011 -> "EPOLLIN|EPOLLERR|EPOLLRDHUP"."""
    return "|".join(name for bit, name in EPOLL_FLAG_NAMES if ev & bit) or "0"


class EventLoop:
    """Serve echo on listeners until a stop signal; the only owner of the epoll fd.

    Args:
        config: the validated configuration.
        listeners: bound (or inherited) listening sockets; the loop owns them.
        notifier: sd_notify; a no-op outside systemd.
        reload: called on SIGHUP; returns the new Config or raises ConfigError.
    """

    def __init__(
        self,
        config: Config,
        listeners: list[Listener],
        notifier: Notifier,
        reload: Callable[[], Config] | None = None,
    ) -> None:
        self._config = config
        self._notifier = notifier
        self._reload_source = reload
        self._ep = select.epoll()
        self._conns: dict[int, Connection] = {}
        self._listeners: dict[int, Listener] = {}
        self._paused: dict[int, Listener] = {}  # listeners waiting out EMFILE & co.
        self._ready: list[tuple[int, int]] = []  # synthetic events for the next turn
        self._reschedule = self._ready.append  # one bound method shared by all connections
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_seq = itertools.count()
        self._per_ip: dict[str, int] = {}
        self._now = time.monotonic()
        self._started_at = self._now
        self._stopping = False
        self._done = False
        self._paused_since: float | None = None  # the current EMFILE episode
        self._splice_fallback = False  # no pipe to be had: new connections copy instead
        self._pipes = 0  # open splice connections, each holding a pipe (2 fds)
        # What the process holds before any client (stdio, epoll, listeners, ...), plus
        # room for log files and the pidfile.
        self._base_fds = len(os.listdir("/proc/self/fd")) + 16
        self._signal_handlers: dict[int, Callable[[int], None]] = {
            signal.SIGTERM: self._on_stop_signal,
            signal.SIGINT: self._on_stop_signal,
            signal.SIGHUP: self._on_reload_signal,
            signal.SIGUSR1: self._on_stats_signal,
        }
        # Totals of closed connections; live ones are added when reporting.
        self._accepted = 0
        self._refused = 0
        self._refused_unlogged = 0
        self._refused_logged_at = -REFUSED_WARNING_EVERY_S
        self._bytes_in = 0
        self._bytes_out = 0
        self._status_bytes = (self._now, 0)
        self._wake_r, self._wake_w = socket.socketpair()
        self._idle = IdleTimer(config.limits.idle_timeout_s)
        self._read_buf = memoryview(bytearray())  # sized by _apply_settings
        self._apply_settings(config)
        for listener in listeners:
            self._add_listener(listener)

    # -- settings ----------------------------------------------------------------

    def _apply_settings(self, config: Config) -> None:
        """Cache what the hot paths read, so that they read plain attributes."""
        self._config = config
        self._edge = config.trigger == "edge"
        self._listen_mask = EPOLLIN | select.EPOLLET if self._edge else EPOLLIN
        self._trace = config.logging.level == "trace"
        self._splice = config.io == "splice"
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self._pipe_budget = max(0, (nofile - self._base_fds - config.limits.max_connections) // 2)
        if len(self._read_buf) != config.buffers.read_size_bytes:
            self._read_buf = memoryview(bytearray(config.buffers.read_size_bytes))
        # Decided once per configuration, not per connection: the log call or None.
        if config.logging.connections:
            self._conn_log: Callable[..., Any] | None = log.info
        elif logsetup.enabled("debug"):
            self._conn_log = log.debug
        else:
            self._conn_log = None

    @property
    def listeners(self) -> list[Listener]:
        return [*self._listeners.values(), *self._paused.values()]

    # -- running -------------------------------------------------------------------

    def run(self) -> int:
        """Install signal handling, report readiness, and loop until stopped. Returns 0."""
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._ep.register(self._wake_r.fileno(), EPOLLIN)
        old_wakeup = signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        old_handlers = {s: signal.signal(s, _record_only) for s in self._signal_handlers}
        try:
            self._start_timers()
            for listener in self.listeners:
                log.info(
                    "listening",
                    address=listener.name,
                    fd=listener.fd,
                    trigger=self._config.trigger,
                    io=self._config.io,
                    inherited=listener.inherited,
                )
            self._notifier.ready(self._status_line())
            self._run_until_done()
            log.info("shutdown_complete", **self.stats())
        finally:
            for s, h in old_handlers.items():
                signal.signal(s, h)
            signal.set_wakeup_fd(old_wakeup)
            self._close_everything()
        return 0

    def _run_until_done(self) -> None:
        conns = self._conns
        listeners = self._listeners
        ready = self._ready
        timers = self._timers
        poll = self._ep.poll
        modify = self._ep.modify
        wake_fd = self._wake_r.fileno()
        while not self._done:
            if ready:
                timeout = 0.0
            elif timers:
                timeout = max(0.0, timers[0][0] - time.monotonic())
            else:
                timeout = -1.0
            events = poll(timeout, MAX_EVENTS)
            now = self._now = time.monotonic()
            if ready:
                events += ready
                ready.clear()
            if self._trace:
                self._trace_batch(events)
            accepting: list[Listener] = []
            for fd, ev in events:
                conn = conns.get(fd)
                if conn is not None:
                    conn.active_at = now
                    try:
                        mask = conn.on_event(ev)
                    except Exception:
                        log.exception("connection_bug", fd=fd, conn=repr(conn))
                        conn.reason = "error"
                        mask = CLOSE
                    if mask != conn.mask:
                        if mask:
                            modify(fd, mask)
                            conn.mask = mask
                        else:
                            self._close(conn)
                elif fd in listeners:
                    accepting.append(listeners[fd])
                elif fd == wake_fd:
                    self._on_wakeup()
            for listener in accepting:
                self._accept(listener)
            if timers and timers[0][0] <= now:
                self._run_timers(now)

    def _trace_batch(self, events: list[tuple[int, int]]) -> None:
        for fd, ev in events:
            log.debug("epoll_event", fd=fd, events=describe_events(ev))

    # -- accepting -----------------------------------------------------------------

    def _add_listener(self, listener: Listener) -> None:
        self._listeners[listener.fd] = listener
        self._ep.register(listener.fd, self._listen_mask)

    def _accept(self, listener: Listener) -> None:
        """Accept until EAGAIN, at most one backlog's worth per wakeup."""
        limits = self._config.limits
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
                log.info("accept_resumed", paused_s=round(self._now - self._paused_since, 3))
                self._paused_since = None
            ip = addr[0] if listener.is_tcp else ""
            if len(self._conns) >= limits.max_connections:
                self._refuse(sock, addr, ip, "max_connections", limits.max_connections)
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
            self._ready.append((listener.fd, EPOLLIN))

    def _open(self, sock: socket.socket, addr: Any, ip: str, listener: Listener) -> None:
        sock.setblocking(False)
        if ip:
            # Echo is request/response: Nagle would hold back the tail of every reply.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
        peer = _peer_name(sock, addr) if ip else listener.name
        buffers = self._config.buffers
        settings: dict[str, Any] = {
            "edge": self._edge,
            "buf": self._read_buf,
            "high_water": buffers.high_water_bytes,
            "low_water": buffers.low_water_bytes,
            "reschedule": self._reschedule,
            "now": self._now,
        }
        conn: Connection
        pipe = self._make_pipe() if self._splice else None
        if pipe is not None:
            conn = SpliceConnection(sock, peer, ip, pipe=pipe, **settings)
            self._pipes += 1
        else:
            conn = Connection(sock, peer, ip, **settings)
        self._conns[conn.fd] = conn
        self._ep.register(conn.fd, conn.mask)
        self._idle.add(conn)
        self._accepted += 1
        if self._conn_log is not None:
            self._conn_log(
                "connection_opened",
                peer=peer,
                fd=conn.fd,
                listener=listener.name,
                io="splice" if pipe is not None else "copy",
            )

    def _make_pipe(self) -> tuple[int, int, int] | None:
        """A pipe for a splice connection, or None to fall back to copying (logged once
        per episode): a client is never dropped for want of a pipe.

        Pipes stay within a budget that leaves one descriptor for each of max_connections:
        otherwise splice connections (3 fds each) would use up RLIMIT_NOFILE and later
        clients would wait in the backlog instead of being served by copying.
        """
        if self._pipes >= self._pipe_budget:
            self._splice_unavailable("descriptor budget", budget=self._pipe_budget)
            return None
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
                connections=len(self._conns),
                **fields,
            )

    def _refuse(self, sock: socket.socket, addr: Any, ip: str, limit: str, value: int) -> None:
        """Close a peer over a limit at once; warn at most every REFUSED_WARNING_EVERY_S."""
        if self._conn_log is not None:
            self._conn_log(
                "connection_closed",
                peer=_peer_name(sock, addr),
                fd=sock.fileno(),
                bytes_in=0,
                bytes_out=0,
                duration_s=0.0,
                reason="limit",
                error=None,
            )
        sock.close()
        self._refused += 1
        self._refused_unlogged += 1
        if self._now - self._refused_logged_at >= REFUSED_WARNING_EVERY_S:
            log.warning(
                "connection_refused",
                limit=limit,
                value=value,
                peer_ip=ip or None,
                refused=self._refused_unlogged,
            )
            self._refused_unlogged = 0
            self._refused_logged_at = self._now

    def _pause_accepting(self, listener: Listener, e: OSError) -> None:
        """Out of descriptors or memory: stop watching the listener for a while."""
        self._ep.unregister(listener.fd)
        del self._listeners[listener.fd]
        self._paused[listener.fd] = listener
        if self._paused_since is None:  # once per episode
            self._paused_since = self._now
            log.warning(
                "accept_paused",
                address=listener.name,
                error=errno.errorcode.get(e.errno or 0),
                retry_s=ACCEPT_RETRY_S,
                connections=len(self._conns),
            )
        self._call_later(ACCEPT_RETRY_S, lambda: self._resume_accepting(listener))

    def _resume_accepting(self, listener: Listener) -> None:
        if self._paused.pop(listener.fd, None) is None or self._stopping:
            return
        self._add_listener(listener)

    # -- closing -------------------------------------------------------------------

    def _close(self, conn: Connection, reason: str = "") -> None:
        """Unregister, then close (trio's notify_closing order), and account for it."""
        fd = conn.fd
        del self._conns[fd]
        self._ep.unregister(fd)
        conn.close()
        if isinstance(conn, SpliceConnection):
            self._pipes -= 1
        self._idle.remove(conn)
        if conn.ip:
            left = self._per_ip[conn.ip] - 1
            if left:
                self._per_ip[conn.ip] = left
            else:
                del self._per_ip[conn.ip]
        self._bytes_in += conn.bytes_in
        self._bytes_out += conn.bytes_out
        if reason:
            conn.reason = reason
        if self._conn_log is not None:
            self._conn_log(
                "connection_closed",
                peer=conn.peer,
                fd=fd,
                bytes_in=conn.bytes_in,
                bytes_out=conn.bytes_out,
                duration_s=round(self._now - conn.opened_at, 3),
                reason=conn.reason or "error",
                error=conn.error or None,
            )
        if self._stopping and not self._conns:
            self._done = True

    def _close_everything(self) -> None:
        for conn in list(self._conns.values()):
            conn.discard_pending()
            self._close(conn, "shutdown")
        for listener in self.listeners:
            listeners_mod.close(listener)
        self._listeners.clear()
        self._paused.clear()
        self._ep.close()
        self._wake_r.close()
        self._wake_w.close()

    # -- timers --------------------------------------------------------------------

    def _call_later(self, delay_s: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (self._now + delay_s, next(self._timer_seq), fn))

    def _run_timers(self, now: float) -> None:
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, fn = heapq.heappop(timers)
            fn()

    def _start_timers(self) -> None:
        """The periodic work; each timer reads its interval from the current settings, so a
        reload changes it without adding timers."""
        self._every(lambda: self._idle.tick_s, self._sweep_idle)
        self._every(lambda: self._config.stats_interval_s or 1.0, self._periodic_stats)
        if self._notifier.enabled:
            self._every(lambda: STATUS_EVERY_S, self._send_status)
        watchdog_s = self._notifier.watchdog_interval_s()
        if watchdog_s:
            # From the loop itself, not a thread: a stuck loop stops pinging.
            self._every(lambda: watchdog_s, self._watchdog_ping)

    def _every(self, interval_s: Callable[[], float], fn: Callable[[], None]) -> None:
        """Run fn every interval_s() seconds, for as long as the loop runs."""

        def tick() -> None:
            fn()
            self._call_later(interval_s(), tick)

        self._call_later(interval_s(), tick)

    def _periodic_stats(self) -> None:
        if self._config.stats_interval_s > 0:
            self._log_stats()

    def _watchdog_ping(self) -> None:
        if self._config.watchdog:
            self._notifier.watchdog_ping()

    def _sweep_idle(self) -> None:
        for conn in self._idle.expired(self._now):
            self._close(conn, "idle_timeout")  # type: ignore[arg-type]

    # -- signals -------------------------------------------------------------------

    def _on_wakeup(self) -> None:
        try:
            data = self._wake_r.recv(4096)
        except BlockingIOError:
            return
        for signum in data:
            handler = self._signal_handlers.get(signum)
            if handler is not None:
                handler(signum)

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
        log.info("shutdown_started", signal=why, connections=len(self._conns), timeout_s=timeout_s)
        self._notifier.stopping(f"stopping: draining {len(self._conns)} connections")
        self._notifier.extend_timeout(timeout_s + 5.0)
        for fd in self._listeners:
            self._ep.unregister(fd)
        for listener in self.listeners:
            listeners_mod.close(listener)
        self._listeners.clear()
        self._paused.clear()
        for conn in list(self._conns.values()):
            mask = conn.begin_shutdown()
            if mask == CLOSE:
                self._close(conn)
            elif mask != conn.mask:
                self._ep.modify(conn.fd, mask)
                conn.mask = mask
        self._call_later(timeout_s, self._force_stop)
        if not self._conns:
            self._done = True

    def _force_stop(self, signal_name: str | None = None) -> None:
        """Close what is left, unsent output dropped: at shutdown_timeout or a second SIGINT."""
        if not self._done:
            left = len(self._conns)
            for conn in list(self._conns.values()):
                conn.discard_pending()
                self._close(conn, "shutdown")
            if left or signal_name:
                reason = "second_signal" if signal_name else "shutdown_timeout"
                log.warning("shutdown_forced", reason=reason, signal=signal_name, connections=left)
        self._done = True

    def _on_reload_signal(self, signum: int) -> None:
        if self._stopping or self._reload_source is None:
            return
        self._notifier.reloading()
        try:
            self.apply(self._reload_source())
        except EpolldError as e:  # the old configuration stays in force
            log.error("config_reload_failed", error=str(e))
            self._notifier.ready(f"reload failed, running on the previous configuration: {e}")
            return
        self._notifier.ready(self._status_line())

    def apply(self, new: Config) -> None:
        """Switch to a new configuration as one step, or raise and change nothing.

        Raises:
            BindError: a new address could not be bound; the old listeners stay.
        """
        old = self._config
        if not any(lst.inherited for lst in self.listeners):
            self._reconcile_listeners(old, new)
        elif new.listen != old.listen:
            log.warning("listen_ignored", reason="sockets come from systemd socket activation")
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
        if new.trigger != old.trigger:
            # Open connections keep the mode they were registered in; listeners switch,
            # or an edge-triggered listener could sit on a backlog the level code leaves.
            for fd in self._listeners:
                self._ep.modify(fd, self._listen_mask)
        buffers = new.buffers
        for conn in self._conns.values():
            conn.buf = self._read_buf
            conn.high_water = buffers.high_water_bytes
            conn.low_water = buffers.low_water_bytes
        if new.limits.idle_timeout_s != old.limits.idle_timeout_s:
            self._idle.retime(new.limits.idle_timeout_s, list(self._conns.values()))

    def _reconcile_listeners(self, old: Config, new: Config) -> None:
        """Keep listeners that stay, bind added ones first, then close removed ones.

        Binding first means a failed reload leaves the old listeners as they were: the
        daemon is never without one. The price: an address that overlaps one being
        removed (127.0.0.1:7080 -> 0.0.0.0:7080) cannot be bound in the same reload.

        Raises:
            BindError: nothing was changed.
        """
        current = {lst.address: lst for lst in self.listeners if lst.address is not None}
        added: list[Listener] = []
        try:
            for address in new.listen:
                if address not in current:
                    added.append(self._bind_beside(address, new.backlog, current))
        except Exception:
            for listener in added:
                listeners_mod.close(listener)
            raise
        for address, listener in current.items():
            if address not in new.listen:
                if listener.fd in self._listeners:
                    self._ep.unregister(listener.fd)
                    del self._listeners[listener.fd]
                self._paused.pop(listener.fd, None)
                listeners_mod.close(listener)
                log.info("listener_closed", address=listener.name)
            elif new.backlog != old.backlog:
                listener.sock.listen(new.backlog)
        for listener in added:
            self._add_listener(listener)
            log.info("listening", address=listener.name, fd=listener.fd, trigger=new.trigger)

    def _bind_beside(
        self, address: ListenAddress, backlog: int, current: dict[ListenAddress, Listener]
    ) -> Listener:
        """Bind a new address; if our own listener holds its port, say so."""
        try:
            return listeners_mod.bind(address, backlog)
        except BindError as e:
            if e.errno == errno.EADDRINUSE and address.family != "unix":
                # The bound port, not the configured one, which may be 0.
                ours = [
                    lst.name
                    for lst in current.values()
                    if lst.is_tcp and lst.sock.getsockname()[1] == address.port
                ]
                if ours:
                    raise BindError(
                        f"cannot listen on {address}: it overlaps {', '.join(ours)}, which "
                        "this daemon holds; remove that in one reload and add this in the "
                        "next, or restart",
                        errno=e.errno,
                    ) from None
            raise

    # -- reporting -----------------------------------------------------------------

    def _byte_totals(self) -> tuple[int, int]:
        """Bytes in and out so far: closed connections' totals plus the open ones'."""
        conns = self._conns.values()
        return (
            self._bytes_in + sum(c.bytes_in for c in conns),
            self._bytes_out + sum(c.bytes_out for c in conns),
        )

    def stats(self) -> dict[str, Any]:
        """Live counters."""
        bytes_in, bytes_out = self._byte_totals()
        return {
            "connections": len(self._conns),
            "accepted": self._accepted,
            "refused": self._refused,
            "bytes_in": bytes_in,
            "bytes_out": bytes_out,
            "uptime_s": round(self._now - self._started_at, 1),
            "listeners": len(self._listeners),
            "accept_paused": bool(self._paused),
            "splice_connections": self._pipes,
        }

    def _on_stats_signal(self, signum: int) -> None:
        self._log_stats()

    def _log_stats(self) -> None:
        log.info("stats", **self.stats())

    def _status_line(self) -> str:
        names = " ".join(lst.name for lst in self.listeners)
        now = time.monotonic()
        total = self._byte_totals()[1]
        then, before = self._status_bytes
        self._status_bytes = (now, total)
        rate = (total - before) / (now - then) / 1e6 if now > then else 0.0
        return f"echoing on {names}; {len(self._conns)} connections; {rate:.1f} MB/s"

    def _send_status(self) -> None:
        self._notifier.status(self._status_line())


def _peer_name(sock: socket.socket, addr: Any) -> str:
    if sock.family == socket.AF_INET6:
        return f"[{addr[0]}]:{addr[1]}"
    if sock.family == socket.AF_INET:
        return f"{addr[0]}:{addr[1]}"
    return "unix"


def _record_only(signum: int, frame: object) -> None:
    """The wakeup fd already carries the signal number to the loop: nothing to do here."""


def _jsonable(value: object) -> object:
    return value if isinstance(value, (str, int, float, bool, type(None), list)) else str(value)
