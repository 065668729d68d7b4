"""The daemon's own small listeners (the metrics endpoint, HAProxy's agent, the control
socket): what they share, the listener, its accept loop and its pause.

Each is level-triggered whatever `trigger` says (little traffic). An event only queues an
accept for after the batch (see loop.py on fd reuse); accepting then takes at most
`accept_per_event` connections, so one wakeup does bounded work, and the rest are reported
again next turn. Out of descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM) a
level-triggered listener would spin (381,189 wakeups in 1 s, measured), so it leaves the
reactor for ACCEPT_RETRY_S, as the echo listeners do (service/admission.py). A connection
that died in the backlog (ECONNABORTED, EPROTO; EPERM from a firewall) is skipped.

A subclass answers each accepted socket (`serve`); a client that outlives the accept is
an EndpointClient (its socket, its deadline), attached (`attach`) so that close() closes
it with the listener.
"""

from __future__ import annotations

import errno
import select
import socket
from collections.abc import Callable
from typing import ClassVar

import structlog

from epolld.core.loop import Handler, Reactor, Timer
from epolld.listening.sockets import Listener

log = structlog.get_logger("epolld")

ACCEPT_RETRY_S = 0.5  # after EMFILE & co., as for the echo listeners
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPT_IGNORED_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})


class Endpoint:
    """A listener of the daemon's own and the clients it keeps, on the daemon's reactor.

    Args:
        reactor: the daemon's reactor; the endpoint registers its listener there.
        listener: the bound listening socket; the endpoint owns it from now on.
    """

    accept_per_event: ClassVar[int] = 16  # connections accepted per wakeup at most
    paused_event: ClassVar[str] = "endpoint_accept_paused"  # log events: the subclass's
    failed_event: ClassVar[str] = "endpoint_accept_failed"

    def __init__(self, reactor: Reactor, listener: Listener) -> None:
        self.listener = listener
        self._reactor = reactor
        self._clients: set[Handler] = set()
        self._accept_pending = False
        self._paused = False
        self._closed = False
        listener.mask = select.EPOLLIN
        listener.on_ready = self._ready
        reactor.add(listener)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.listener.name} clients={len(self._clients)}>"

    @property
    def clients(self) -> int:
        return len(self._clients)

    def close(self) -> None:
        """Close the listener and every client (a reload removed or moved the endpoint)."""
        self._closed = True
        for client in list(self._clients):
            self._reactor.close(client)
        self._reactor.close(self.listener)  # unregistered already if paused: closed all the same

    def serve(self, sock: socket.socket) -> None:
        """Answer one accepted connection: attach a client for it, or close it."""
        raise NotImplementedError

    def attach(self, client: Handler) -> None:
        """Register a client; it calls forget() from its close()."""
        self._clients.add(client)
        self._reactor.add(client)

    def forget(self, client: Handler) -> None:
        self._clients.discard(client)

    def _ready(self, listener: Listener) -> None:
        if not self._accept_pending:
            self._accept_pending = True
            self._reactor.call_soon(self._accept)

    def _accept(self) -> None:
        self._accept_pending = False
        for _ in range(self.accept_per_event):
            if self._closed or self._paused:
                return
            try:
                sock, _ = self.listener.sock.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in RESOURCE_ERRNOS:
                    self._pause(e)
                    return
                if e.errno not in ACCEPT_IGNORED_ERRNOS:
                    log.warning(self.failed_event, address=self.listener.name, error=str(e))
                    return
                continue
            self.serve(sock)
        # Level-triggered: connections still waiting are reported again next turn.

    def _pause(self, e: OSError) -> None:
        self._paused = True
        self._reactor.remove(self.listener)
        log.warning(
            self.paused_event,
            address=self.listener.name,
            error=errno.errorcode.get(e.errno or 0),
            retry_s=ACCEPT_RETRY_S,
        )
        self._reactor.call_later(ACCEPT_RETRY_S, self._resume)

    def _resume(self) -> None:
        if self._paused and not self._closed:
            self._paused = False
            self._reactor.add(self.listener)


class EndpointClient:
    """One client of an Endpoint, as a reactor handler: its non-blocking socket, a deadline
    that closes it (`timeout_s` from the accept or the last `rearm()`), and its endpoint
    forgets it at close. A subclass reads and answers in on_event().

    Args:
        sock: the accepted socket; the client owns it from now on.
        reactor: the daemon's reactor (the endpoint registers the client there).
        forget: the endpoint's forget(), called at close.
    """

    __slots__ = ("_deadline", "_forget", "_reactor", "active_at", "fd", "mask", "sock")

    timeout_s: ClassVar[float] = 5.0

    def __init__(
        self, sock: socket.socket, reactor: Reactor, forget: Callable[[Handler], None]
    ) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.fd = sock.fileno()
        self.mask = select.EPOLLIN
        self.active_at = reactor.now
        self._reactor = reactor
        self._forget = forget
        self._deadline: Timer | None = reactor.call_later(self.timeout_s, self._expire)

    def on_event(self, events: int) -> int:
        raise NotImplementedError

    def rearm(self) -> None:
        """Give the client timeout_s again from now (an answer went out)."""
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self._reactor.call_later(self.timeout_s, self._expire)

    def _expire(self) -> None:
        self._deadline = None
        self._reactor.close(self)

    def close(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self.sock.close()
        self._forget(self)
