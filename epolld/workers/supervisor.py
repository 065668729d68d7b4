"""The supervisor (workers: > 1): binds every listener, forks the workers, replaces the
ones that die or hang, and is the one process systemd and the operator see.

How connections reach workers (measured: bench/workers_dispatch.py):

- A TCP address gets one SO_REUSEPORT socket per worker *slot*, all bound here. The
  kernel hashes each connection to one of them: 1,000 connections spread within a few
  percent. A shared socket with EPOLLEXCLUSIVE wakes the first idle worker in the wait
  queue, and idle workers took 1,000 connections 1000/0 (2 workers), so it is not used
  for TCP.
- The supervisor keeps every slot's socket open. A worker that dies closes only its own
  copy: the connections queued on its socket stay queued and its replacement (same
  slot, same socket) accepts them. Nothing accepted by the kernel is reset.
- Unix sockets (no SO_REUSEPORT) and systemd's sockets are one socket that every worker
  serves, registered with EPOLLEXCLUSIVE (Listener.shared): one worker wakes per
  connection, and a stopping worker loses nothing, the others accept from the same queue.
- UDP sockets (udp.py) fit the TCP shape: one SO_REUSEPORT socket per slot.

The restart handoff (SIGUSR2; systemd's RestartKillSignal): every worker hands its
connections up its socketpair (worker.py) and exits; the supervisor writes a state of its
own (each slot's listeners, each worker's transport: handoff_workers.py) and stores it or
re-executes, as a single process does. The next supervisor starts each slot's worker with
its predecessor's transport. Without systemd, a worker that cannot hand over aborts the
whole handoff: the workers that did are replaced by ones that take their connections back.

Health: each worker's loop sends a heartbeat every heartbeat_s. A worker silent for
worker_timeout_s (a quarter of WatchdogSec, or WORKER_TIMEOUT_S) is killed (SIGKILL) and
replaced; WATCHDOG=1 is sent only while every worker has checked in within that time,
so a supervisor that cannot get a healthy worker lets systemd restart the service.
The supervisor holds no connection and does no echo; a worker never sends sd_notify.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import errno
import json
import os
import pickle
import select
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from epolld import __version__, handoff
from epolld import config as config_mod
from epolld.config import Config, tls_certificate_files
from epolld.core.counters import Counters, DurationHistogram, Snapshot
from epolld.core.loop import CLOSE, Reactor, Timer
from epolld.errors import ConfigError, EpolldError
from epolld.listening import listener_set
from epolld.listening.listener_set import ListenerSet, Plan
from epolld.listening.sockets import Listener
from epolld.observability import logsetup
from epolld.systemd import Notifier
from epolld.workers import handoff as handoff_workers
from epolld.workers import worker

if TYPE_CHECKING:
    from epolld.observability.metrics import MetricsApp, MetricsEndpoint

log = structlog.get_logger("epolld")

WORKER_TIMEOUT_S = 10.0  # without a systemd watchdog: a worker silent this long is replaced
HEARTBEAT_MAX_S = 1.0
STATUS_EVERY_S = 5.0
REPLY_WAIT_S = 5.0  # for the workers' answers to a reload or a stats request
KILL_AFTER_DRAIN_S = 5.0  # past shutdown_timeout_s, a worker still alive gets SIGKILL
QUICK_DEATH_S = 10.0  # a worker that dies younger than this adds to its slot's back-off
BACKOFF_MAX_S = 30.0
MESSAGES_PER_EVENT = 64
HANDOFF_WAIT_S = 10.0  # for every worker to hand over and exit
BARRIER_TIMEOUT_S = 10.0  # for systemd to take the handoff's descriptors into its store
MAX_FDS_PER_MESSAGE = 2 * handoff.MAX_PAIRS + 1  # a worker's transport: pairs and memfd
NOT_SUMMED = frozenset({"listeners", "udp_listeners", "uptime_s"})
# Changing these needs other workers: a stop and start (fewer slots would close
# REUSEPORT sockets, resetting the connections queued on them).
RESTART_ONLY = ("workers",)


@dataclass(eq=False)
class Slot:
    """One worker's place: its listeners, and the process that serves them now."""

    index: int
    listeners: list[Listener]
    pid: int | None = None
    link: WorkerLink | None = None
    started_at: float = 0.0
    heard_at: float = 0.0
    ready: bool = False
    killed_for: str | None = None  # why the supervisor killed it, if it did
    failures: int = 0  # quick deaths in a row
    respawn: Timer | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    counters: dict[str, Any] = field(default_factory=dict)
    # A worker's handoff transport, (FDNAME, fd): held for the slot's next worker, which
    # takes over its connections (or written into the supervisor's own handoff).
    handoff: list[tuple[str, int]] | None = None
    restored: int = 0  # connections the current worker took over at its start

    def drop_handoff(self) -> None:
        for _, fd in self.handoff or ():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.handoff = None


@dataclass(eq=False)
class HandoffRound:
    """A restart handoff in progress: who has yet to answer, who failed."""

    destination: handoff.Destination
    signal_at: float
    waiting: set[Slot]
    failed: dict[int, str] = field(default_factory=dict)
    timer: Timer | None = None
    stop_signal: int | None = None  # a stop that came during the round, for its end


@dataclass
class UdpSums:
    """The workers' UDP counters summed (counters.UdpTotals), for the metrics endpoint."""

    received: int
    echoed: int
    dropped: dict[str, int]


class WorkerLink:
    """The supervisor's end of a worker's socketpair, as a reactor handler."""

    __slots__ = ("_on_message", "active_at", "fd", "mask", "slot", "sock")

    def __init__(
        self,
        sock: socket.socket,
        slot: Slot,
        on_message: Callable[[Slot, dict[str, Any], list[int]], None],
    ) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.fd = sock.fileno()
        self.mask = select.EPOLLIN
        self.active_at = 0.0
        self.slot = slot
        self._on_message = on_message

    def on_event(self, events: int) -> int:
        ancillary = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * 4)
        for _ in range(MESSAGES_PER_EVENT):
            try:
                packet, cmsgs, _flags, _ = self.sock.recvmsg(
                    worker.MAX_PACKET, ancillary, socket.MSG_CMSG_CLOEXEC
                )
            except BlockingIOError:
                return self.mask
            except OSError:
                packet, cmsgs = b"", []
            fds = array.array("i")
            for level, kind, payload in cmsgs:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            if not packet:  # the worker exited; SIGCHLD tells the rest
                _close_all(fds)
                return CLOSE
            try:
                message = json.loads(packet)
            except ValueError:
                log.warning("worker_message_invalid", worker=self.slot.index)
                _close_all(fds)
                continue
            self._on_message(self.slot, message, list(fds))
        return self.mask

    def send(self, packet: bytes, fds: list[int] | None = None) -> bool:
        """One packet down, with descriptors (SCM_RIGHTS) if fds."""
        try:
            if fds:
                rights = (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))
                self.sock.sendmsg([packet], [rights])
            else:
                self.sock.send(packet)
        except OSError as e:
            log.warning("worker_send_failed", worker=self.slot.index, error=str(e))
            return False
        return True

    def close(self) -> None:
        self.sock.close()

    def __repr__(self) -> str:
        return f"<WorkerLink fd={self.fd} worker={self.slot.index}>"


class Supervisor:
    """Run `len(slots)` workers on the given listeners until a stop signal.

    Args:
        config: the validated configuration.
        slots: per worker, the listeners it serves (a shared one appears in every list).
        notifier: sd_notify; only this process sends.
        reload: called on SIGHUP; returns the new Config or raises ConfigError.
        metrics_listener: bound for metrics.listen, if set: served here, from the sums.
        before_reload: what a worker runs before applying a reload (daemon mode: reopen
            its log file).
        resumed: what a restart handoff brought (each slot's predecessor's transport,
            the totals), if this supervisor was started by one.
        handoff_sources: more records for the handoff (the daemon's pidfile).
    """

    def __init__(
        self,
        config: Config,
        slots: list[list[Listener]],
        notifier: Notifier,
        reload: Callable[[], Config],
        metrics_listener: Listener | None = None,
        before_reload: Callable[[], None] = lambda: None,
        *,
        resumed: handoff_workers.Resumed | None = None,
        handoff_sources: list[handoff.HandoffSource] | None = None,
    ) -> None:
        self._config = config
        self._notifier = notifier
        self._reload_source = reload
        self._before_reload = before_reload
        self.reactor = Reactor()
        # Every listening socket; a slot's list is the set's own list for that slot, so
        # that a reload's changes are what the slot's next worker inherits at its fork.
        self.listener_set = ListenerSet(slots, metrics_listener)
        self._slots = [
            Slot(i + 1, listeners) for i, listeners in enumerate(self.listener_set.slots)
        ]
        self._by_pid: dict[int, Slot] = {}
        self._stopping = False
        self._announced = False
        self._started_at = self.reactor.now
        self.counters = Counters()  # the reloads; the rest is summed from the workers
        self._retired = Counters()  # what workers that exited had counted
        self._retired_stats = dict.fromkeys(("accepted", "refused", "bytes_in", "bytes_out"), 0)
        self._stats_waiting: set[Slot] = set()
        self._reload_waiting: set[Slot] = set()
        self._reload_timer: Timer | None = None
        self._status_bytes = (time.monotonic(), 0)
        watchdog = notifier.watchdog_interval_s()  # half of WATCHDOG_USEC
        self._watchdog_s = watchdog
        self.worker_timeout_s = watchdog / 2 if watchdog else WORKER_TIMEOUT_S
        self.heartbeat_s = min(HEARTBEAT_MAX_S, self.worker_timeout_s / 3)
        for signum, fn in {
            signal.SIGTERM: self._on_stop_signal,
            signal.SIGINT: self._on_stop_signal,
            signal.SIGHUP: self._on_reload_signal,
            signal.SIGUSR1: self._on_stats_signal,
            signal.SIGCHLD: self._reap,
            signal.SIGUSR2: self._on_handoff_signal,
        }.items():
            self.reactor.on_signal(signum, fn)
        self._metrics: MetricsEndpoint | None = None
        self._metrics_app: MetricsApp | None = None
        self._handoff: HandoffRound | None = None
        self._handoff_sources = handoff_sources or []
        self.handed_over = False
        self._resumed = resumed
        if resumed is not None:
            for slot in self._slots:
                slot.handoff = resumed.transports.pop(slot.index, None)
            for transport in resumed.transports.values():  # slots this run does not have
                Slot(0, [], handoff=transport).drop_handoff()
            totals = resumed.totals
            self._started_at = float(totals.get("started_at", self._started_at))
            self.counters.reloads = dict(totals.get("reloads") or {})
            _add_counters(self._retired, totals.get("retired") or {})
            for key, value in (totals.get("retired_stats") or {}).items():
                self._retired_stats[key] = int(value)

    # -- running -------------------------------------------------------------------

    def run(self) -> int:
        """Start the workers and supervise them until stopped. Returns 0."""
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
        """SIGCHLD is handled from here on: a worker that dies at once is seen."""
        log.info(
            "supervisor_started",
            workers=len(self._slots),
            heartbeat_s=self.heartbeat_s,
            worker_timeout_s=self.worker_timeout_s,
        )
        if self.listener_set.metrics is not None:
            self._serve_metrics()
        for slot in self._slots:
            self._spawn(slot)
        every = self.reactor.every
        every(lambda: self.heartbeat_s, self._check_workers)
        every(lambda: self._config.stats_interval_s or 1.0, self._periodic_stats)
        if self._notifier.enabled:
            every(lambda: STATUS_EVERY_S, self._send_status)
        if self._watchdog_s:
            # Every worker_timeout_s (a quarter of WatchdogSec), not every half: a ping held
            # back while a stuck worker is replaced leaves three more before the deadline.
            every(lambda: self.worker_timeout_s, self._watchdog_ping)

    def _finish(self) -> None:
        self.reactor.stop()

    def _live(self) -> list[Slot]:
        return [slot for slot in self._slots if slot.pid is not None]

    # -- workers -------------------------------------------------------------------

    def _spawn(self, slot: Slot) -> None:
        slot.respawn = None
        ours, theirs = socket.socketpair(
            socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC
        )
        try:
            pid = os.fork()
        except OSError:
            ours.close()
            theirs.close()
            raise
        if pid == 0:  # the worker: never returns
            code = os.EX_SOFTWARE
            try:
                ours.close()
                code = self._become_worker(slot, theirs)
            except BaseException:
                log.exception("worker_crashed")
            finally:
                os._exit(code)
        theirs.close()
        slot.drop_handoff()  # the worker has its own copies now
        now = self.reactor.now
        slot.pid, slot.started_at, slot.heard_at = pid, now, now
        slot.ready, slot.killed_for, slot.stats, slot.counters = False, None, {}, {}
        slot.link = WorkerLink(ours, slot, self._on_message)
        self.reactor.add(slot.link)
        self._by_pid[pid] = slot
        log.info("worker_started", worker=slot.index, pid=pid)

    def _become_worker(self, slot: Slot, sock: socket.socket) -> int:
        """In the forked child: let go of what is the supervisor's, then serve."""
        # Until the worker's reactor installs its own: a signal must not be written to the
        # supervisor's wakeup socket (it would read it as its own), and a stop is a stop.
        signal.set_wakeup_fd(-1)
        # A process group of its own: Ctrl-C, or a kill of the supervisor's group, reaches
        # the supervisor only, which stops the workers in order (a worker that stopped on
        # its own first would be replaced). Under systemd, KillMode=mixed does the same.
        os.setpgid(0, 0)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        for signum in (signal.SIGHUP, signal.SIGUSR1):
            signal.signal(signum, signal.SIG_IGN)
        for handler in self.reactor.handlers():  # links to other workers, metrics sockets
            handler_sock = getattr(handler, "sock", None)
            if isinstance(handler_sock, socket.socket):
                handler_sock.close()
        if self.listener_set.metrics is not None:
            self.listener_set.metrics.sock.close()
        self.reactor.abandon()
        mine = {id(listener) for listener in slot.listeners}
        for other in self._slots:
            for listener in other.listeners:
                if id(listener) not in mine:
                    listener.sock.close()
            if other is not slot:
                other.drop_handoff()
        inherited, slot.handoff = slot.handoff, None
        return worker.run(
            slot.index,
            self._config,
            slot.listeners,
            sock,
            self.heartbeat_s,
            self._before_reload,
            inherited=inherited,
        )

    def _on_message(self, slot: Slot, message: dict[str, Any], fds: list[int]) -> None:
        slot.heard_at = self.reactor.now
        kind = message.get("kind")
        if kind == "handed_over":
            self._handed_over(slot, message, fds)
            return
        _close_all(fds)  # no other message carries descriptors
        if kind in ("heartbeat", "stats"):
            slot.stats = message.get("stats") or {}
            slot.counters = message.get("counters") or {}
            if kind == "stats" and slot in self._stats_waiting:
                self._stats_waiting.discard(slot)
                if not self._stats_waiting:
                    self._log_stats()
        elif kind == "ready":
            slot.ready = True
            slot.restored = int(message.get("restored") or 0)
            log.info("worker_ready", worker=slot.index, pid=slot.pid)
            if self._stopping:  # it started during a stop (its handlers are in place now)
                _kill(slot.pid, signal.SIGTERM)
                return
            if not self._announced and all(s.ready for s in self._slots):
                self._announced = True
                log.info("workers_ready", workers=len(self._slots))
                self._notifier.ready(self._status_line())
                if self._resumed is not None:
                    self._log_handoff_complete(self._resumed)
        elif kind == "handoff_failed":
            self._handoff_failed(slot, str(message.get("error")))
        elif kind == "reloaded":
            if message.get("error"):
                log.error("worker_reload_failed", worker=slot.index, error=message["error"])
            if slot in self._reload_waiting:
                self._reload_waiting.discard(slot)
                if not self._reload_waiting:
                    self._reload_done()

    def _reap(self, signum: int = signal.SIGCHLD) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = self._by_pid.pop(pid, None)
            if slot is not None:
                self._worker_exited(slot, status)

    def _worker_exited(self, slot: Slot, status: int) -> None:
        now = self.reactor.now
        if os.WIFSIGNALED(status):
            how: dict[str, Any] = {"signal": signal.Signals(os.WTERMSIG(status)).name}
        else:
            how = {"exit_code": os.waitstatus_to_exitcode(status)}
        lived = now - slot.started_at
        if slot.handoff is None:  # else its totals travel with its connections
            self._retire(slot)
        fields = {
            "worker": slot.index,
            "pid": slot.pid,
            "connections": slot.stats.get("connections", 0),
            "lived_s": round(lived, 1),
            "reason": slot.killed_for,
            **how,
        }
        if slot.link is not None:
            slot.link.on_event(select.EPOLLIN)  # what it sent last (a handoff) comes first
            self.reactor.close(slot.link)
            slot.link = None
        slot.pid = None
        slot.ready = False
        self._stats_waiting.discard(slot)
        reload_answered = slot in self._reload_waiting
        self._reload_waiting.discard(slot)
        if reload_answered and not self._reload_waiting:
            self._reload_done()
        if self._stopping:
            log.info("worker_exited", **fields)
            if not self._live():
                self._finish()
            return
        if slot.handoff is not None:  # handed over: nothing went with it
            log.info("worker_exited", **fields, handed_over=True)
            if self._handoff is not None:
                self._handoff_progress()
            else:  # a late handover: its successor takes the connections back now
                self._spawn(slot)
            return
        if self._handoff is not None:  # died before it could answer: what it held is gone
            log.warning("worker_exited", **fields)
            self._handoff_failed(slot, "exited without handing over")
            return
        # Connections it held are gone with it; those queued on its socket wait for the
        # replacement (the socket is ours, and stays open).
        log.warning("worker_exited", **fields)
        slot.failures = slot.failures + 1 if lived < QUICK_DEATH_S else 1
        delay = 0.0 if slot.failures <= 1 else min(BACKOFF_MAX_S, 0.5 * 2 ** (slot.failures - 2))
        log.info("worker_respawning", worker=slot.index, delay_s=delay)
        slot.respawn = self.reactor.call_later(delay, lambda: self._spawn(slot))

    def _retire(self, slot: Slot) -> None:
        """Keep what an exiting worker counted, so that the totals never go back."""
        for key, value in slot.stats.items():
            if type(value) is int and key not in NOT_SUMMED and key != "connections":
                self._retired_stats[key] = self._retired_stats.get(key, 0) + value
        self._retired_stats.pop("splice_connections", None)
        self._retired_stats.pop("udp_sources", None)
        if slot.counters:
            _add_counters(self._retired, slot.counters)

    def _check_workers(self) -> None:
        """Kill a worker whose loop stopped checking in (SIGSTOP, a hang): it is replaced."""
        now = self.reactor.now
        # One a handoff round waits for has the round's deadline: it may yet hand over.
        waited = self._handoff.waiting if self._handoff is not None else set()
        for slot in self._live():
            silent_s = now - slot.heard_at
            if slot in waited:
                continue
            if slot.killed_for is None and silent_s > self.worker_timeout_s and slot.pid:
                slot.killed_for = "unresponsive"
                log.error(
                    "worker_unresponsive",
                    worker=slot.index,
                    pid=slot.pid,
                    silent_s=round(silent_s, 1),
                    connections=slot.stats.get("connections", 0),
                )
                _kill(slot.pid, signal.SIGKILL)

    def _healthy(self) -> bool:
        now = self.reactor.now
        return all(
            now - slot.heard_at <= self.worker_timeout_s and slot.killed_for is None
            for slot in self._live()
        )

    def _watchdog_ping(self) -> None:
        if self._config.watchdog and self._healthy():
            self._notifier.watchdog_ping()

    # -- signals -------------------------------------------------------------------

    def _on_stop_signal(self, signum: int) -> None:
        if self._stopping:
            if signum == signal.SIGINT:  # a second Ctrl-C: the workers stop at once too
                for slot in self._live():
                    _kill(slot.pid, signal.SIGINT)
            return
        if self._handoff is not None:
            # Until every worker has answered or exited (10 s at most), one may be sending
            # its connections up: stopping now would close them. The round's end stops.
            if self._handoff.stop_signal is None:
                log.info("shutdown_deferred", signal=signal.Signals(signum).name)
            self._handoff.stop_signal = signum
            return
        self._stopping = True
        timeout_s = self._config.shutdown_timeout_s
        stats = self.stats()
        log.info(
            "shutdown_started",
            signal=signal.Signals(signum).name,
            connections=stats["connections"],
            workers=len(self._live()),
            timeout_s=timeout_s,
        )
        self._notifier.stopping(f"stopping: draining {stats['connections']} connections")
        self._notifier.extend_timeout(timeout_s + KILL_AFTER_DRAIN_S + 5.0)
        for slot in self._slots:
            if slot.respawn is not None:
                slot.respawn.cancel()
                slot.respawn = None
        # Our copies go first: when a worker closes its own, the socket is closed.
        self._close_listeners()
        self._stop_metrics()
        for slot in self._live():
            if slot.ready:  # one still starting is told once it says it is ready
                _kill(slot.pid, signal.SIGTERM)
        self.reactor.call_later(timeout_s + KILL_AFTER_DRAIN_S, self._kill_remaining)
        if not self._live():
            self._finish()

    # -- the restart handoff ------------------------------------------------------

    def _on_handoff_signal(self, signum: int) -> None:
        """SIGUSR2: ask every worker for its connections; once all have handed over and
        exited, _complete_handoff() passes everything on."""
        if self._stopping or self._handoff is not None:
            log.warning(
                "handoff_refused", reason="stopping already" if self._stopping else "in progress"
            )
            return
        try:
            destination: handoff.Destination = (
                handoff.FdStore(self._notifier, BARRIER_TIMEOUT_S)
                if self._notifier.enabled
                else handoff.Reexec()
            )
        except handoff.HandoffError as e:
            log.error("handoff_failed", reason=str(e), action="serve on")
            return
        for slot in self._slots:  # a slot in back-off starts afresh in the next process
            if slot.respawn is not None:
                slot.respawn.cancel()
                slot.respawn = None
        asked = {s for s in self._live() if s.link is not None and s.link.send(b"H")}
        self._handoff = HandoffRound(destination, handoff.now_monotonic(), asked)
        log.info("handoff_started", workers=len(asked), route=type(destination).__name__)
        self._notifier.status(f"handing over: {len(asked)} workers")
        self._handoff.timer = self.reactor.call_later(HANDOFF_WAIT_S, self._handoff_timeout)
        self._handoff_progress()

    def _handed_over(self, slot: Slot, message: dict[str, Any], fds: list[int]) -> None:
        names = [str(n) for n in message.get("names") or []]
        if slot.handoff is not None or len(names) != len(fds):
            log.warning("worker_handoff_unexpected", worker=slot.index)
            _close_all(fds)
            return
        # Late too (a stuck worker that woke after its round was given up): the worker
        # has let go, so these are the only copies, and its successor takes them back.
        slot.handoff = list(zip(names, fds, strict=True))
        round_ = self._handoff
        late = round_ is None or slot not in round_.waiting
        log.info("worker_handed_over", worker=slot.index, pid=slot.pid, late=late)
        if round_ is not None:
            round_.waiting.discard(slot)
            self._handoff_progress()

    def _handoff_failed(self, slot: Slot, error: str) -> None:
        round_ = self._handoff
        if round_ is None:
            return
        round_.waiting.discard(slot)
        round_.failed[slot.index] = error
        log.error("worker_handoff_failed", worker=slot.index, error=error)
        self._handoff_progress()

    def _handoff_timeout(self) -> None:
        round_ = self._handoff
        if round_ is None:
            return
        round_.timer = None
        for slot in list(round_.waiting):
            self._handoff_failed(slot, f"no answer in {HANDOFF_WAIT_S} s")
        for slot in self._slots:  # handed over but still alive: its descriptors are ours
            if slot.handoff is not None and slot.pid is not None:
                _kill(slot.pid, signal.SIGKILL)

    def _handoff_progress(self) -> None:
        """Go on once every worker answered and those that handed over have exited."""
        round_ = self._handoff
        if round_ is None or round_.waiting:
            return
        if any(slot.handoff is not None and slot.pid is not None for slot in self._slots):
            return
        if round_.timer is not None:
            round_.timer.cancel()
        self._complete_handoff(round_)

    def _complete_handoff(self, round_: HandoffRound) -> None:
        if round_.stop_signal is not None:  # the stop wins: the connections come back, drain
            log.info("handoff_cancelled", reason="stopping")
            self._give_back()
            self._on_stop_signal(round_.stop_signal)
            return
        under_systemd = isinstance(round_.destination, handoff.FdStore)
        if round_.failed and not under_systemd:
            self._abort_handoff(f"workers {sorted(round_.failed)} could not hand over")
            return
        steps = {"workers": round(handoff.now_monotonic() - round_.signal_at, 4)}
        out = handoff.StateWriter(systemd_keeps_inherited=round_.destination.keeps_inherited)
        handoff_workers.write_records(out, self._slots, self.listener_set)
        for source in self._handoff_sources:
            out.add(source.handoff_state(out))
        meta = {
            "epolld": __version__,
            "pid": os.getpid(),
            "signal_at": round_.signal_at,
            "config": config_mod.render_config(self._config),
            "config_source": self._config.source,
            "workers": len(self._slots),
            "supervisor": {
                "started_at": self._started_at,
                "reloads": self.counters.reloads,
                "retired": dataclasses.asdict(self._retired),
                "retired_stats": self._retired_stats,
            },
        }
        try:
            handoff.send(out, meta, round_.destination, steps)
        except handoff.HandoffError as e:
            self._abort_handoff(str(e))
            return
        self._handoff = None
        self.handed_over = True
        serving = self._live()
        if serving:  # under systemd, and they could not hand over: they drain, then we go
            log.warning("handoff_partial", draining=[s.index for s in serving])
            self._stopping = True
            for slot in serving:
                _kill(slot.pid, signal.SIGTERM)
            self.reactor.call_later(
                self._config.shutdown_timeout_s + KILL_AFTER_DRAIN_S, self._kill_remaining
            )
        else:
            self._finish()

    def _abort_handoff(self, reason: str) -> None:
        """Serve on: each worker that handed over is replaced by one that takes its
        connections back (no systemd), or the service drains (systemd stops it anyway)."""
        under_systemd = self._notifier.enabled
        action = "drain" if under_systemd else "serve on"
        log.error("handoff_failed", reason=reason, action=action)
        self._give_back()
        if under_systemd:
            self._on_stop_signal(signal.SIGTERM)
        else:
            self._notifier.status(f"handoff failed, still serving: {reason}")

    def _give_back(self) -> None:
        """End the handoff round: every slot without a worker gets one, which takes back
        the connections its predecessor handed over (slot.handoff), if it did."""
        round_, self._handoff = self._handoff, None
        if round_ is not None and round_.timer is not None:
            round_.timer.cancel()
        for slot in self._slots:
            if slot.pid is None and slot.respawn is None:
                self._spawn(slot)

    def _log_handoff_complete(self, resumed: handoff_workers.Resumed) -> None:
        signal_at = resumed.signal_at
        now = handoff.now_monotonic()
        log.info(
            "handoff_complete",
            connections=sum(slot.restored for slot in self._slots),
            workers=len(self._slots),
            old_version=resumed.old_version,
            new_version=__version__,
            old_pid=resumed.old_pid,
            duration_s=round(now - signal_at, 4) if signal_at is not None else None,
            steps=resumed.steps,
        )
        self._resumed = None

    def _let_go(self) -> None:
        """After a handoff: close our copies only (every socket lives on in the store or in
        flight), so that no Unix socket file is removed."""
        for handler in self.reactor.handlers():
            self.reactor.remove(handler)
            handler_sock = getattr(handler, "sock", None)
            if isinstance(handler_sock, socket.socket):
                handler_sock.close()
        for listener in self.listener_set.unique():
            listener.sock.close()
        if self.listener_set.metrics is not None:
            self.listener_set.metrics.sock.close()
        for slot in self._slots:
            slot.drop_handoff()
        self.reactor.release()

    def _kill_remaining(self) -> None:
        for slot in self._live():
            log.warning("worker_killed", worker=slot.index, pid=slot.pid, reason="drain_timeout")
            _kill(slot.pid, signal.SIGKILL)

    def _on_reload_signal(self, signum: int) -> None:
        """SIGHUP: bind what the file adds (one socket per slot), then send each live
        worker its new sockets and the configuration; a file that cannot be applied
        reaches no worker and changes nothing."""
        if self._stopping:
            return
        self._notifier.reloading()
        old = self._config
        try:
            new = self._reload_source()
            fixed = [k for k in config_mod.changes(old, new) if k in RESTART_ONLY]
            if fixed:
                raise ConfigError(
                    f"{', '.join(fixed)}: cannot change on reload with workers; "
                    "stop and start epolld"
                )
            plan = self.listener_set.plan(old, new)
        except EpolldError as e:  # every worker stays on the old configuration
            self.counters.count_reload(ok=False)
            log.error("config_reload_failed", error=str(e))
            self._notifier.ready(f"reload failed, running on the previous configuration: {e}")
            return
        self.counters.count_reload(ok=True)
        if new.logging != old.logging:
            logsetup.configure(new.logging.level, new.logging.format)
        self._config = new  # replacements start with it
        packet = b"C" + pickle.dumps(new)
        if self._reload_timer is not None:  # a reload during a reload: answer for both
            self._reload_timer.cancel()
        self._reload_waiting = {
            s for s in self._live() if s.link and self._send_reload(s, s.link, plan, packet)
        }
        # Our copies of removed sockets close now (a Unix socket's file goes); each
        # worker closes its own as it applies the file. A slot's next worker is forked
        # with the slot's sockets as they are from here on.
        self.listener_set.commit(plan, release_metrics=self._release_metrics)
        if plan.metrics is not None:
            self._serve_metrics()
        self._reload_timer = self.reactor.call_later(REPLY_WAIT_S, self._reload_done)
        if not self._reload_waiting:
            self._reload_done()

    def _send_reload(self, slot: Slot, link: WorkerLink, plan: Plan, packet: bytes) -> bool:
        """The slot's new sockets (SCM_RIGHTS), then the configuration that lists them."""
        added = plan.added[slot.index - 1]
        if added:
            records = [listener_set.describe(listener) for listener in added]
            message = b"L" + json.dumps(records).encode()
            if not link.send(message, [listener.fd for listener in added]):
                return False
        return link.send(packet)

    def _release_metrics(self, listener: Listener) -> None:
        if self._metrics is not None and self._metrics.listener is listener:
            self._stop_metrics()
        else:
            listener.close()

    def _reload_done(self) -> None:
        """Every worker answered (or REPLY_WAIT_S passed): READY=1 ends the reload."""
        if self._reload_timer is not None:
            self._reload_timer.cancel()
            self._reload_timer = None
        waited, self._reload_waiting = self._reload_waiting, set()
        if waited:
            log.warning("workers_reload_unanswered", workers=[s.index for s in waited])
        log.info("workers_reloaded", workers=len(self._live()))
        self._notifier.ready(self._status_line())

    def _on_stats_signal(self, signum: int) -> None:
        """Ask every worker for its numbers now; log the sums once all have answered."""
        if self._stats_waiting:
            return
        self._stats_waiting = {s for s in self._live() if s.link and s.link.send(b"S")}
        if self._stats_waiting:
            self.reactor.call_later(REPLY_WAIT_S, self._stats_timeout)
        else:
            self._log_stats()

    def _stats_timeout(self) -> None:
        if self._stats_waiting:
            self._stats_waiting = set()
            self._log_stats()

    def _periodic_stats(self) -> None:
        if self._config.stats_interval_s > 0 and not self._stats_waiting:
            self._log_stats()

    # -- reporting -----------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """The workers' statistics summed (as last reported), and one line per worker."""
        live = self._live()
        total: dict[str, Any] = dict(self._retired_stats)
        total.update(connections=0, splice_connections=0)
        for slot in live:  # every count a worker reports (udp_* too), summed
            for key, value in slot.stats.items():
                if type(value) is int and key not in NOT_SUMMED:
                    total[key] = total.get(key, 0) + value
                elif isinstance(value, dict):  # by reason: proxy_header_errors
                    part = total.setdefault(key, {})
                    for reason, n in value.items():
                        part[reason] = part.get(reason, 0) + int(n)
        for key in ("listeners", "udp_listeners"):  # every worker serves every address
            total[key] = max((int(s.stats.get(key, 0)) for s in live), default=0)
        return {
            **total,
            "uptime_s": round(self.reactor.now - self._started_at, 1),
            "accept_paused": any(s.stats.get("accept_paused") for s in live),
            "workers": [
                {
                    "worker": s.index,
                    "pid": s.pid,
                    "connections": s.stats.get("connections", 0),
                    "accepted": s.stats.get("accepted", 0),
                }
                for s in live
            ],
        }

    def _log_stats(self) -> None:
        log.info("stats", **self.stats())

    def snapshot(self) -> Snapshot:
        """The metrics endpoint's view: every worker's counters summed, with the exited
        workers' totals, and this process's reloads."""
        counters = Counters()
        _add_counters(counters, dataclasses.asdict(self._retired))
        for slot in self._live():
            if slot.counters:
                _add_counters(counters, slot.counters)
        counters.accepted = max(counters.accepted, 0)
        counters.reloads = dict(self.counters.reloads)
        counters.last_reload_ok = self.counters.last_reload_ok
        stats = self.stats()
        udp = None
        if stats.get("udp_listeners") or stats.get("udp_received"):
            udp = UdpSums(
                received=stats.get("udp_received", 0),
                echoed=stats.get("udp_echoed", 0),
                dropped={
                    key[len("udp_dropped_") :]: value
                    for key, value in stats.items()
                    if key.startswith("udp_dropped_")
                },
            )
        return Snapshot(
            counters=counters,
            connections=stats["connections"],
            bytes_received=stats["bytes_in"],
            bytes_sent=stats["bytes_out"],
            listeners=stats["listeners"],
            accept_paused=stats["accept_paused"],
            udp=udp,
            proxy_header_errors=stats.get("proxy_header_errors")
            if any(lst.proxy_protocol for lst in self._slots[0].listeners)
            else None,
            tls_certificates=self._tls_certificates(),
        )

    def _tls_certificates(self) -> dict[str, float] | None:
        """The served certificates' notAfter, read from the files (the workers hold the
        contexts); None without a TLS listener (ssl is then not imported)."""
        files = tls_certificate_files(self._config)
        if not files:
            return None
        from epolld.tls import certs

        return certs.expiries(files)

    def _status_line(self) -> str:
        names = " ".join(sorted({lst.name for lst in self._slots[0].listeners}))
        stats = self.stats()
        now = time.monotonic()
        then, before = self._status_bytes
        self._status_bytes = (now, stats["bytes_out"])
        rate = (stats["bytes_out"] - before) / (now - then) / 1e6 if now > then else 0.0
        return (
            f"echoing on {names}; {len(self._live())} workers; "
            f"{stats['connections']} connections; {rate:.1f} MB/s"
        )

    def _send_status(self) -> None:
        self._notifier.status(self._status_line())

    # -- closing -------------------------------------------------------------------

    def _close_listeners(self) -> None:
        for listener in self.listener_set.unique():
            listener.close()

    def _serve_metrics(self) -> None:
        listener = self.listener_set.metrics
        assert listener is not None
        from epolld.observability import metrics  # prometheus_client: only when metrics are on

        if self._metrics_app is None:  # one registry for the process, across reloads
            self._metrics_app = metrics.MetricsApp(self.snapshot)
        self._metrics = metrics.MetricsEndpoint(self.reactor, listener, self._metrics_app)
        log.info("metrics_listening", address=listener.name)

    def _stop_metrics(self) -> None:
        if self._metrics is not None:
            log.info("metrics_closed", address=self._metrics.listener.name)
            self._metrics.close()
            self._metrics = None
        elif self.listener_set.metrics is not None:
            self.listener_set.metrics.close()
        self.listener_set.metrics = None

    def _close_everything(self) -> None:
        for slot in self._live():  # only if the loop itself failed: leave no orphans
            _kill(slot.pid, signal.SIGKILL)
        self._close_listeners()
        self._stop_metrics()
        self.reactor.release()


def _close_all(fds: Any) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _kill(pid: int | None, signum: int) -> None:
    if pid is None:
        return
    try:
        os.kill(pid, signum)
    except OSError as e:
        if e.errno != errno.ESRCH:
            raise


def _add_counters(total: Counters, part: dict[str, Any]) -> None:
    """Add one worker's Counters (as dataclasses.asdict() made them) into total."""
    total.accepted += int(part.get("accepted", 0))
    for name in ("refused", "closed", "reloads", "tls_handshakes", "tls_handshake_failures"):
        mine = getattr(total, name)
        for key, value in (part.get(name) or {}).items():
            mine[key] = mine.get(key, 0) + int(value)
    total.bytes_received += int(part.get("bytes_received", 0))
    total.bytes_sent += int(part.get("bytes_sent", 0))
    for name in ("durations", "tls_handshake_durations"):
        durations = part.get(name) or {}
        counts = durations.get("counts") or []
        hist: DurationHistogram = getattr(total, name)
        for i, value in enumerate(counts[: len(hist.counts)]):
            hist.counts[i] += int(value)
        hist.sum_s += float(durations.get("sum_s", 0.0))
