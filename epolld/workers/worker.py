"""One worker process (workers: > 1): an EchoService on the listeners its supervisor
bound, reporting to the supervisor over a SOCK_SEQPACKET socketpair (the messages both
ends speak on it: link.py).

Totals (counters.Counters.to_dict()): "counters" is what this worker counted itself, its
totals less those it restored from its predecessor's handoff ("inherited", sent once):
the supervisor has counted those already (its sum takes a worker's last counters when it
hands over or dies), so that nothing is counted twice and nothing waits for a report.

The restart handoff with workers: each worker writes its state and sends its descriptors
into pairs as a single process would (handoff.py), then passes that transport (the memfd
and the pairs: a handful of descriptors) up the socketpair. The supervisor stores it with
its own listeners; the next supervisor gives it to the slot's first worker, which restores
it as a single process restores its own.

A worker never talks to systemd (its Notifier has an empty environment): the supervisor
is the service's main process and the only one systemd accepts messages from.
"""

from __future__ import annotations

import array
import errno
import json
import os
import select
import socket
from collections.abc import Callable
from typing import Any

import structlog

from epolld import handoff
from epolld.config import Config, worker_count
from epolld.core.counters import Counters
from epolld.core.loop import CLOSE
from epolld.listening import listener_set
from epolld.listening.sockets import Listener
from epolld.service.echo import EchoService
from epolld.services import info
from epolld.systemd import Notifier
from epolld.workers import link as link_mod
from epolld.workers.link import Down, Up

log = structlog.get_logger("epolld")

MESSAGES_PER_EVENT = 16  # the supervisor sends a few a minute; bound the work anyway
# A heartbeat's totals add up every open connection's bytes: 0.5 µs each with a warm cache,
# several times that cold. Sent every second by 60 workers holding 1,000,000 connections,
# that alone is more than a whole core, and starved workers stop checking in (the million
# run replaced 14 of them). So the totals come with every heartbeat only up to this many
# connections, and with one in ceil(connections / this) above: about 1 ms per worker and
# heartbeat at most, whatever it holds. The others carry the live values alone.
TOTALS_CONNECTIONS_PER_BEAT = 2000
# Events a worker dispatches per turn (a single process: loop.MAX_EVENTS, 1024), its timers
# (the heartbeat) running between turns. A turn's wall time is its CPU times the workers
# busy on the same core: at the million run's release, 60 workers on one core, each with
# 16,700 connections echoing at once (1,000,000 echoes in 79 s: about 40 µs each), had turns
# of 1024 events, about 40 ms of CPU, up to 11 s of wall time, and the supervisor replaced 57
# of them as silent. 64 events keep a turn near 3 ms of CPU; one more epoll_wait() per 64
# events is lost in the noise.
EVENTS_PER_TURN = 64
MAX_FDS_DOWN = 253  # sockets a reload may send in one message (SCM_MAX_FD)
HANDOFF_SEND_TIMEOUT_S = 5.0  # for room in the socketpair (the supervisor reads it)


class SupervisorLink:
    """The worker's end of the socketpair, as a reactor handler."""

    __slots__ = (
        "_config",
        "_handed_down",
        "_handing_over",
        "_ready_sent",
        "_service",
        "_totals_due_in",
        "active_at",
        "fd",
        "inherited",
        "mask",
        "sock",
    )

    def __init__(self, sock: socket.socket, config: Config) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.fd = sock.fileno()
        self.mask = select.EPOLLIN
        self.active_at = 0.0
        self._config = config
        self._ready_sent = False
        self._handing_over = False
        self._service: EchoService | None = None
        self._handed_down = listener_set.HandedDown()
        self.inherited = Counters()  # the totals restored from the predecessor's handoff
        self._totals_due_in = 0  # heartbeats until the next one that carries the totals

    def serve(self, service: EchoService) -> None:
        """Serve service, whose listeners on reload are the ones the supervisor sends."""
        self._service = service
        service.listener_set.take_from(self._handed_down)

    def config(self) -> Config:
        """The reload source: the configuration the supervisor sent last."""
        return self._config

    def ready(self, restored: int = 0) -> None:
        if not self._ready_sent:
            self._ready_sent = True
            inherited = self.inherited.to_dict()
            self.send({"kind": Up.READY, "restored": restored, "inherited": inherited})

    def heartbeat(self) -> None:
        """From the worker's own loop: a stuck loop stops checking in. The totals come
        along in one heartbeat of every few above TOTALS_CONNECTIONS_PER_BEAT
        connections (the supervisor keeps the last ones it got)."""
        service = self._service
        if service is None:
            return
        if self._totals_due_in > 0:
            self._totals_due_in -= 1
            # The live values only: the stored totals stand in for the stats line's own
            # (the supervisor sums "counters", which this message does not replace).
            stats = service.stats(service.report.stored_totals())
            self.send({"kind": Up.HEARTBEAT, "stats": stats})
            return
        self._totals_due_in = service.admission.conn_count // TOTALS_CONNECTIONS_PER_BEAT
        self._report(Up.HEARTBEAT)

    def _report(self, kind: str) -> None:
        service = self._service
        if service is not None:
            totals = service.totals()
            stats = service.stats(totals)
            self.send({"kind": kind, "stats": stats, "counters": self._own(totals)})

    def _own(self, totals: Counters | None = None) -> dict[str, Any]:
        """What this worker counted itself (see the module's docstring)."""
        assert self._service is not None
        own = self._service.totals() if totals is None else totals.copy()
        own.subtract(self.inherited)
        return own.to_dict()

    def send(self, message: dict[str, Any]) -> None:
        try:
            self.sock.send(link_mod.encode(message))
        except OSError as e:  # full (the supervisor is behind) or gone: the next one counts
            log.debug("supervisor_send_failed", error=str(e))

    def on_event(self, events: int) -> int:
        service = self._service
        ancillary = socket.CMSG_SPACE(MAX_FDS_DOWN * 4)
        for _ in range(MESSAGES_PER_EVENT):
            fds = array.array("i")
            try:
                packet, cmsgs, _flags, _ = self.sock.recvmsg(
                    link_mod.MAX_PACKET, ancillary, socket.MSG_CMSG_CLOEXEC
                )
            except BlockingIOError:
                return self.mask
            except OSError:
                packet, cmsgs = b"", []
            for level, kind, payload in cmsgs:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            if packet[:1] == Down.LISTENERS:
                self._take_listeners(packet[1:], list(fds))
                continue
            for fd in fds:  # no other message carries descriptors
                os.close(fd)
            if not packet:  # the supervisor is gone: nobody would replace or stop us
                if service is not None:
                    log.warning("supervisor_gone")
                    service.stop("supervisor_gone")
                return CLOSE
            if packet[:1] == Down.CONFIG and service is not None:
                self._config = link_mod.config_of(packet)
                self.send({"kind": Up.RELOADED, "error": service.reload()})
                self._handed_down.clear()
            elif packet[:1] == Down.STATS:
                self._report(Up.STATS)
            elif packet[:1] == Down.HAND_OVER and service is not None and not self._handing_over:
                self._handing_over = True  # after this batch: the state is then consistent
                service.reactor.call_soon(self._hand_over)
        return self.mask

    def _take_listeners(self, payload: bytes, fds: list[int]) -> None:
        """Keep the sockets sent for the next configuration (see HandedDown)."""
        try:
            records = json.loads(payload)
            if len(records) != len(fds):
                raise ValueError(f"{len(records)} listeners, {len(fds)} descriptors")
        except ValueError as e:
            log.warning("supervisor_message_invalid", error=str(e))
            for fd in fds:
                os.close(fd)
            return
        for record, fd in zip(records, fds, strict=True):
            self._handed_down.put(listener_set.from_record(record, fd))

    def _hand_over(self) -> None:
        self._handing_over = False
        service = self._service
        assert service is not None
        if service.stopping:
            self.send({"kind": Up.HANDOFF_FAILED, "error": "stopping already"})
        elif not service.hand_over(
            Upstream(self.sock, self._own),
            listeners_travel=False,
            processes=worker_count(self._config),  # the user's in-flight limit is shared
        ):
            self.send({"kind": Up.HANDOFF_FAILED, "error": "see this worker's handoff_failed"})

    def close(self) -> None:
        self.sock.close()

    def handoff_state(self, out: handoff.StateWriter) -> None:
        """Nothing travels: the next worker gets a socketpair of its own."""
        return None

    def __repr__(self) -> str:
        return f"<SupervisorLink fd={self.fd}>"


class Upstream:
    """A worker's handoff destination: the transport goes up the socketpair."""

    keeps_inherited = True  # the listeners do not travel from a worker at all

    def __init__(self, sock: socket.socket, totals: Callable[[], dict[str, Any]]) -> None:
        self._sock = sock
        self._totals = totals  # the worker's own, final once its connections are written

    def deliver(
        self, transport: handoff.Transport, out: handoff.StateWriter, steps: dict[str, float]
    ) -> None:
        """Raises HandoffError if the supervisor cannot be reached (nothing is lost)."""
        out.append_trailer(transport.memfd, {"steps": steps})
        named = transport.named()
        message = link_mod.encode(
            {"kind": Up.HANDED_OVER, "names": [n for n, _ in named], "counters": self._totals()}
        )
        rights = link_mod.rights(fd for _, fd in named)
        self._sock.settimeout(HANDOFF_SEND_TIMEOUT_S)
        try:
            self._sock.sendmsg([message], rights)
        except OSError as e:
            error = handoff.InFlightLimit if e.errno == errno.ETOOMANYREFS else handoff.HandoffError
            raise error(f"to the supervisor: {e.strerror or e}") from None
        finally:
            self._sock.setblocking(False)


class WorkerNotifier(Notifier):
    """A worker's sd_notify: nothing reaches systemd; readiness goes to the supervisor."""

    def __init__(self, link: SupervisorLink) -> None:
        super().__init__(environ={})
        self._link = link

    def ready(self, status: str) -> None:
        self._link.ready(self.restored)

    restored = 0  # connections this worker took over from its predecessor


def run(
    index: int,
    config: Config,
    listeners: list[Listener],
    sock: socket.socket,
    heartbeat_s: float,
    before_reload: Callable[[], None],
    inherited: list[tuple[str, int]] | None = None,
) -> int:
    """Serve as worker `index` until SIGTERM (or the supervisor goes away, or it hands
    over). inherited: the handoff transport of the slot's previous worker, restored
    before the first event."""
    structlog.contextvars.bind_contextvars(worker=index)
    info.worker = index  # what the info service reports
    os.environ.pop("NOTIFY_SOCKET", None)  # only the supervisor talks to systemd
    for listener in listeners:
        listener.keep_path = True  # the supervisor's to remove, at its exit
    link = SupervisorLink(sock, config)

    def reload_source() -> Config:
        before_reload()  # daemon mode: reopen the log file, as the supervisor did
        return link.config()

    notifier = WorkerNotifier(link)
    service = EchoService(config, listeners, notifier, reload=reload_source, handoff_signal=False)
    service.handoff.exits_at_once = True  # _spawn's os._exit() follows run()
    service.reactor.max_events = EVENTS_PER_TURN
    if inherited:
        received_at = handoff.now_monotonic()
        state, _ = handoff.take_state(inherited)
        if state is not None and state.problem is not None:
            log.warning("handoff_unreadable", reason=state.problem, closed=state.closed)
        elif state is not None:
            counts = service.restore_handoff(
                state, received_s=handoff.now_monotonic() - received_at
            )
            notifier.restored = counts.get("connection", 0)
            link.inherited = service.totals()
    link.serve(service)
    service.reactor.add(link)
    service.reactor.every(lambda: heartbeat_s, link.heartbeat)
    return service.run()
