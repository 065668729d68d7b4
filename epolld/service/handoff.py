"""The service's side of the restart handoff (epolld/handoff.py moves the descriptors):
out, every handler's record and the totals; in, a restorer per kind of record, then the
handoff_complete line once the loop serves.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import Any, Protocol

import structlog

from epolld import handoff
from epolld.core.counters import Counters
from epolld.core.loop import Reactor
from epolld.listening.listener_set import ListenerSet
from epolld.listening.sockets import Listener
from epolld.process import log_handoff_complete
from epolld.service import over_limit
from epolld.service.admission import Admission
from epolld.service.proxied import Proxied
from epolld.service.report import Report
from epolld.services import stream
from epolld.systemd import Notifier
from epolld.tcp.connection import Connection
from epolld.tcp.splice import SpliceConnection, connection_class
from epolld.udp.endpoint import UdpEndpoints

log = structlog.get_logger("epolld")


class HandsOver(Protocol):
    """What the handoff asks of the process that wires the parts."""

    @property
    def metrics_listener(self) -> Listener | None:
        """The metrics endpoint's socket, if it serves."""

    def handoff_meta(self, signal_at: float) -> dict[str, Any]:
        """The state document's keys every process writes."""

    def endpoint_listeners(self) -> list[Listener]:
        """The agent and control sockets, which the next process binds again."""

    def restore_metrics(self, listener: Listener) -> None:
        """Serve the metrics endpoint on the socket the previous process handed over."""

    def serve(self, listener: Listener) -> None:
        """Serve a listening socket by its kind (TCP and Unix, TLS, UDP)."""

    def restore_tls_closing(self, record: dict[str, Any], state: handoff.State) -> None:
        """A TLS connection the previous process echoed and closed: send its last bytes."""


class Handoff:
    """Write the service's records into a handoff, and restore them from one.

    Args:
        reactor: the process's reactor (its handlers are the records).
        notifier: sd_notify (STATUS=).
        counters: the totals that travel.
        listener_set: every listening socket (restored ones join it).
        admission, proxied, udp, report: the parts whose state travels.
        process: the metrics endpoint and the document's common keys.
    """

    def __init__(
        self,
        reactor: Reactor,
        notifier: Notifier,
        counters: Counters,
        listener_set: ListenerSet,
        admission: Admission,
        proxied: Proxied,
        udp: UdpEndpoints,
        report: Report,
        process: HandsOver,
    ) -> None:
        self.reactor = reactor
        self._notifier = notifier
        self.counters = counters
        self.listener_set = listener_set
        self._admission = admission
        self._proxied = proxied
        self._udp = udp
        self._report = report
        self._process = process
        # What else contributes a record (the daemon's pidfile), and, in the next process,
        # the handoff it was restored from.
        self.sources: list[handoff.HandoffSource] = []
        self._restored: dict[str, Any] | None = None
        self._restored_at = 0.0
        # A worker leaves with os._exit() right after a handoff: its copies are the
        # kernel's to close, faster than one socket object at a time.
        self.exits_at_once = False

    # -- out -----------------------------------------------------------------------

    def hand_over(
        self, destination: handoff.Destination, *, listeners_travel: bool, processes: int = 1
    ) -> bool:
        """Stop accepting, write every handler's record and send every descriptor to
        destination (systemd's store, a re-exec, a worker's supervisor). True once
        delivered: the caller then stops the loop and lets go of its copies.

        Until the point of no return nothing is closed: a failure logs handoff_failed and
        the service goes on as before (False). Listeners stay behind when they are not
        this process's to hand over (a worker's belong to its supervisor). Client
        connections past this process's share (one of `processes`) of what the user may
        have in flight stay behind and are closed with a FIN (over_limit.py).
        """
        signal_at = handoff.now_monotonic()
        # CPU time beside the wall clock's steps: a busy core stretches the steps, not this.
        cpu_at = time.process_time()
        steps: dict[str, float] = {}
        admission = self._admission
        for listener in admission.listeners:  # accept no more: the backlog waits for the next
            self.reactor.remove(listener)
        out = handoff.StateWriter(systemd_keeps_inherited=destination.keeps_inherited)
        left_behind: dict[str, int] = {}
        metrics_listener = self._process.metrics_listener
        staying = set() if listeners_travel else {id(x) for x in self._listener_handlers()}
        # The agent and control sockets are bound again by the next process.
        staying.update(id(x) for x in self._process.endpoint_listeners())
        # Every other handler first: their descriptors must all travel. Then the client
        # connections, which may stay behind (over_limit.py).
        handlers = self.reactor.handlers()
        clients = [h for h in handlers if isinstance(h, Connection)]
        others = [h for h in handlers if not isinstance(h, Connection)]
        for source in [*admission.listeners, *others, *self.sources]:
            contribute = getattr(source, "handoff_state", None)
            if id(source) in staying:
                continue
            if metrics_listener is not None and source is metrics_listener:
                # A Listener, but not one that accepts echo.
                record = metrics_listener.handoff_state(out)
                if record is not None:
                    out.add({**record, "kind": "metrics_listener"})
            elif contribute is not None:
                out.add(contribute(out))
            else:
                kind = type(source).__name__
                left_behind[kind] = left_behind.get(kind, 0) + 1
        budget = over_limit.budget(processes)
        behind = self._write_clients(out, clients, budget)
        counts = out.counts()
        log.info(
            "handoff_started",
            connections=connections(counts),
            listeners=counts.get("listener", 0),
            **_connection_states(admission.connections()),
            records=counts,
            descriptors=len(out.fds),
            route=type(destination).__name__,
        )
        if left_behind:
            log.warning("handoff_left_behind", kinds=left_behind, reason="no handoff_state()")
        self._notifier.status(f"handing over {admission.conn_count} connections")
        totals = self._report.stored_totals()  # the connections' own bytes are in their records
        _step(steps, "collect", signal_at)
        meta = {
            **self._process.handoff_meta(signal_at),
            # Totals travel, so that stats and metrics stay monotonic across restarts.
            "service": {
                "started_at": self._report.started_at,
                "counters": totals.to_dict(),
                "udp": totals.legacy_udp(),  # where earlier releases read them
            },
        }
        try:
            transport = handoff.send(out, meta, destination, steps, cpu_at=cpu_at)
        except handoff.HandoffError as e:
            for listener in admission.listeners:
                admission.reregister(listener)
            action = "drain" if self._notifier.enabled else "serve on"
            log.error("handoff_failed", reason=str(e), steps=steps, action=action)
            if not self._notifier.enabled:
                self._notifier.status(f"handoff failed, still serving: {e}")
            return False
        if transport.left_behind:  # refused by the kernel: the handlers of those records
            by_fd = {h.fd: h for h in clients}
            for record in transport.left_behind:
                conn = by_fd.get(out.fds[record["fd"]])
                if conn is not None:
                    behind.append(conn)
        if behind:
            reason = (
                "the kernel refused more descriptors in flight (ETOOMANYREFS)"
                if transport.left_behind
                else f"this process's share of the descriptors its user may have in flight: "
                f"{budget}"
            )
            over_limit.close(behind, budget, reason)
        return True

    def _write_clients(
        self, out: handoff.StateWriter, clients: list[Connection], budget: int | None
    ) -> list[Connection]:
        """The client connections' records, after every other one (out.optional_from
        marks where they begin: they may stay behind). Past budget descriptors, a
        connection stays behind; returns those."""
        out.optional_from = len(out.fds)
        proxies = self._proxied.proxies
        behind: list[Connection] = []
        for conn in clients:
            mark = len(out.fds)
            record = conn.handoff_state(out)  # called anyway: a TLS one says goodbye here
            if budget is not None and len(out.fds) > budget:
                out.rewind(mark)
                behind.append(conn)
                continue
            if proxies:  # a proxied client: the proxy's address
                proxy = proxies.get(conn.fd)
                if proxy:
                    record = {**record, "proxy": proxy}
            out.add(record)
        return behind

    def _listener_handlers(self) -> list[object]:
        """The handlers that are listening sockets (TCP and Unix, UDP, metrics)."""
        handlers: list[object] = [*self._admission.listeners, *self._udp.endpoints()]
        metrics_listener = self._process.metrics_listener
        if metrics_listener is not None:
            handlers.append(metrics_listener)
        return handlers

    def let_go(self) -> None:
        """After a handoff: close our copies only. Every socket lives on in the store or
        in flight, so no FIN is sent and no Unix socket file is removed."""
        if self.exits_at_once:
            return
        handlers = self.reactor.handlers()
        # Closing the epoll descriptor first drops every registration at once: no
        # epoll_ctl per handler (1.4 µs each, on the handoff's path at 100,000).
        self.reactor.abandon()
        for handler in handlers:
            if isinstance(handler, SpliceConnection) and handler.pipe_r >= 0:
                os.close(handler.pipe_r)
                os.close(handler.pipe_w)
            sock = getattr(handler, "sock", None)
            if isinstance(sock, socket.socket):
                sock.close()
        self._admission.let_go_listeners()

    # -- in ------------------------------------------------------------------------

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
        cpu_at = time.process_time()
        document = state.document
        totals = document.get("service", {})
        if totals:
            self._report.started_at = float(totals["started_at"])
            self.counters.restore(totals.get("counters") or {}, totals.get("udp"))
        restorers: dict[str, handoff.Restorer] = {
            "listener": self._restore_listener,
            "connection": self._restore_connection,
            stream.HANDOFF_KIND: self._restore_service_connection,
            "metrics_listener": self._restore_metrics_listener,
            "udp": self._restore_udp,
            "proxy_header": self._proxied.restore_header_reader,
            "tls_closing": self._process.restore_tls_closing,
            **(more or {}),
        }
        counts = handoff.restore(state, restorers)
        self._report.restart_rate()
        steps = dict(document.get("steps", {}))
        signal_at = document.get("signal_at")
        if started_at is not None and isinstance(signal_at, float):
            # The old process's exit (or execv) and this one's interpreter start-up.
            steps["startup"] = round(started_at - signal_at - handoff.wall_time(steps), 4)
        steps["receive"] = round(received_s, 4)
        self._restored_at = handoff.now_monotonic()
        steps["restore"] = round(self._restored_at - restore_at, 4)
        steps["restore_cpu"] = round(time.process_time() - cpu_at, 4)
        self._restored = {
            "counts": counts,
            "old_version": document.get("epolld"),
            "old_pid": document.get("pid"),
            "signal_at": document.get("signal_at"),
            "steps": steps,
        }
        return counts

    def _restore_listener(self, record: dict[str, Any], state: handoff.State) -> None:
        listener = Listener.from_handoff(record, state)
        self.listener_set.add(listener)
        self._process.serve(listener)

    def _restore_udp(self, record: dict[str, Any], state: handoff.State) -> None:
        listener = Listener.from_handoff(record, state)
        self.listener_set.add(listener)
        self._udp.add(listener)
        held = record.get("held")
        if held:  # replies a fault listener held for their delay
            self._restore_held(listener, held, state)

    def _restore_held(self, listener: Listener, held: list[Any], state: handoff.State) -> None:
        """Held again while the listener still has faults (as at a reload, none: let go)."""
        for endpoint in self._udp.endpoints():
            if endpoint.listener is listener and endpoint.faults is not None:
                endpoint.faults.restore_held(held, state)

    def _restore_metrics_listener(self, record: dict[str, Any], state: handoff.State) -> None:
        self._process.restore_metrics(Listener.from_handoff(record, state))

    def _restore_connection(self, record: dict[str, Any], state: handoff.State) -> None:
        if record.get("faults") is not None:
            self._restore_faulty(record, state)
            return
        splice = record.get("io") == "splice"
        cls = connection_class(bool(record["edge"]), splice)
        admission = self._admission
        conn = cls.from_handoff(record, state, buf=admission.read_buf, shared=admission.shared)
        if record.get("proxy"):
            self._proxied.proxies[conn.fd] = str(record["proxy"])
        admission.adopt(conn, splice)

    def _restore_service_connection(self, record: dict[str, Any], state: handoff.State) -> None:
        """A discard, chargen or info connection (services/stream.py)."""
        admission = self._admission
        conn = stream.restore(record, state, buf=admission.read_buf, shared=admission.shared)
        if record.get("proxy"):
            self._proxied.proxies[conn.fd] = str(record["proxy"])
        admission.adopt(conn, splice=False)

    def _restore_faulty(self, record: dict[str, Any], state: handoff.State) -> None:
        """A fault listener's connection: its faults travel with it (faults/stream.py)."""
        from epolld.faults import stream as faulty  # only when one was handed over

        admission = self._admission
        conn = faulty.restore(
            record,
            state,
            reactor=self.reactor,
            counts=admission.counters.faults,
            buf=admission.read_buf,
            shared=admission.shared,
        )
        if record.get("proxy"):
            self._proxied.proxies[conn.fd] = str(record["proxy"])
        admission.adopt(conn, splice=False)

    def log_handoff_complete(self, status_line: Callable[[], str]) -> None:
        """Once the loop serves, if this process was started by a handoff."""
        restored = self._restored
        if restored is None:
            return
        steps = restored["steps"]
        steps["ready"] = round(handoff.now_monotonic() - self._restored_at, 4)
        counts = restored["counts"]
        log_handoff_complete(
            connections(counts),
            {"listeners": counts.get("listener", 0), "records": counts},
            old_version=restored["old_version"],
            old_pid=restored["old_pid"],
            signal_at=restored.get("signal_at"),
            steps=steps,
        )
        self._notifier.status(
            f"{status_line()}; took over {connections(counts)} connections "
            f"from {restored['old_version']}"
        )


def _connection_states(conns: list[Connection]) -> dict[str, int]:
    """handoff_started's counts: paused, half-closed, bytes waiting (one pass)."""
    paused = half_closed = pending_bytes = 0
    for conn in conns:
        if conn.eof:
            half_closed += 1
        elif not conn.reading:
            paused += 1
        pending_bytes += conn.pending()
    return {"paused": paused, "half_closed": half_closed, "pending_bytes": pending_bytes}


def connections(counts: dict[str, int]) -> int:
    """Client connections among a handoff's records: echo ones and the services'."""
    return counts.get("connection", 0) + counts.get(stream.HANDOFF_KIND, 0)


def _step(steps: dict[str, float], name: str, since: float) -> float:
    now = handoff.now_monotonic()
    steps[name] = round(now - since, 4)
    return now
