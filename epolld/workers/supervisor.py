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
own (each slot's listeners, each worker's transport: workers/handoff.py) and stores it or
re-executes, as a single process does. The next supervisor starts each slot's worker with
its predecessor's transport. Without systemd, a worker that cannot hand over aborts the
whole handoff: the workers that did are replaced by ones that take their connections back.

Health: each worker's loop sends a heartbeat every heartbeat_s. A worker silent for
worker_timeout_s (a quarter of WatchdogSec, or WORKER_TIMEOUT_S) is killed (SIGKILL) and
replaced; WATCHDOG=1 is sent only while every worker has checked in within that time,
so a supervisor that cannot get a healthy worker lets systemd restart the service.
The supervisor holds no connection and does no echo; a worker never sends sd_notify.

This module manages processes: it forks, reaps and signals. A slot's state and its
transitions are slot.py's table, the handoff round's account is round.py, and the
messages on a worker's socketpair are link.py.
"""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from epolld import config as config_mod
from epolld import handoff
from epolld.config import Config, tls_certificate_files
from epolld.core.counters import Counters, Snapshot
from epolld.core.loop import Timer
from epolld.errors import ConfigError, EpolldError
from epolld.listening import listener_set
from epolld.listening.listener_set import ListenerSet, Plan
from epolld.listening.sockets import Listener
from epolld.observability import logsetup
from epolld.process import HANDOFF_SIGNAL, ProcessShell, log_handoff_complete
from epolld.systemd import Notifier
from epolld.workers import handoff as handoff_workers
from epolld.workers import link, worker
from epolld.workers.link import Down, Up, WorkerLink, close_all
from epolld.workers.round import HANDOFF_WAIT_S, HandoffRound
from epolld.workers.slot import AWAITING_ANSWER, SAID_READY, Event, Slot, State
from epolld.workers.sums import Sums

if TYPE_CHECKING:
    pass

log = structlog.get_logger("epolld")

WORKER_TIMEOUT_S = 10.0  # without a systemd watchdog: a worker silent this long is replaced
HEARTBEAT_MAX_S = 1.0
REPLY_WAIT_S = 5.0  # for the workers' answers to a reload or a stats request
KILL_AFTER_DRAIN_S = 5.0  # past shutdown_timeout_s, a worker still alive gets SIGKILL
QUICK_DEATH_S = 10.0  # a worker that dies younger than this adds to its slot's back-off
BACKOFF_MAX_S = 30.0
# Changing these needs other workers: a stop and start (fewer slots would close
# REUSEPORT sockets, resetting the connections queued on them).
RESTART_ONLY = ("workers",)


class Supervisor(ProcessShell):
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

    _reload_source: Callable[[], Config]  # always given: the supervisor reloads

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
        super().__init__(config, notifier, reload)
        self._before_reload = before_reload
        # Every listening socket; a slot's list is the set's own list for that slot, so
        # that a reload's changes are what the slot's next worker inherits at its fork.
        self.listener_set = ListenerSet(slots, metrics_listener)
        self._slots = [
            Slot(i + 1, listeners) for i, listeners in enumerate(self.listener_set.slots)
        ]
        self._by_pid: dict[int, Slot] = {}
        self._stopping = False
        self._announced = False
        self.counters = Counters()  # the reloads; the rest is summed from the workers
        self.sums = Sums(self._slots, self.counters, self.reactor.now)
        self._stats_waiting: set[Slot] = set()
        self._reload_waiting: set[Slot] = set()
        self._reload_timer: Timer | None = None
        watchdog = notifier.watchdog_interval_s()  # half of WATCHDOG_USEC
        self._watchdog_s = watchdog
        self.worker_timeout_s = watchdog / 2 if watchdog else WORKER_TIMEOUT_S
        self.heartbeat_s = min(HEARTBEAT_MAX_S, self.worker_timeout_s / 3)
        self.on_signals(
            {
                signal.SIGTERM: self._on_stop_signal,
                signal.SIGINT: self._on_stop_signal,
                signal.SIGHUP: self._on_reload_signal,
                signal.SIGUSR1: self._on_stats_signal,
                signal.SIGCHLD: self._reap,
                HANDOFF_SIGNAL: self._on_handoff_signal,
            }
        )
        self._handoff: HandoffRound | None = None
        self._handoff_sources = handoff_sources or []
        self._resumed = resumed
        if resumed is not None:
            for slot in self._slots:
                slot.handoff = resumed.transports.pop(slot.index, None)
            for transport in resumed.transports.values():  # slots this run does not have
                Slot(0, [], handoff=transport).drop_handoff()
            if self.sums.resume(resumed.totals):  # each slot's next worker restores
                # totals no sum of ours holds yet: added when it is ready
                for slot in self._slots:
                    slot.uncounted = slot.handoff is not None

    # -- running -------------------------------------------------------------------

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
        self._every_status()
        # Every worker_timeout_s (a quarter of WatchdogSec), not every half: a ping held
        # back while a stuck worker is replaced leaves three more before the deadline.
        self._every_watchdog(self.worker_timeout_s if self._watchdog_s else None)

    def _finish(self) -> None:
        self.reactor.stop()

    def _live(self) -> list[Slot]:
        return [slot for slot in self._slots if slot.state.has_process]

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
        slot.stats = {}
        slot.apply(Event.FORK)
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
        if kind == Up.HANDED_OVER:
            self._handed_over(slot, message, fds)
            return
        close_all(fds)  # no other message carries descriptors
        if kind in (Up.HEARTBEAT, Up.STATS):
            self.sums.report(slot, message)
            if kind == Up.STATS and slot in self._stats_waiting:
                self._stats_waiting.discard(slot)
                if not self._stats_waiting:
                    self._log_stats()
        elif kind == Up.READY:
            if not slot.allows(Event.READY):
                log.warning("worker_message_unexpected", worker=slot.index, kind=kind)
                return
            slot.apply(Event.READY)
            slot.restored = int(message.get("restored") or 0)
            if slot.uncounted:  # what it took over is in no sum of ours yet
                slot.uncounted = False
                self.sums.inherited(message.get("inherited") or {})
            log.info("worker_ready", worker=slot.index, pid=slot.pid)
            if self._stopping:  # it started during a stop (its handlers are in place now)
                if slot.state is State.SERVING:
                    self._terminate(slot)
                return
            if not self._announced and all(s.state in SAID_READY for s in self._slots):
                self._announced = self.readiness.started = True
                log.info("workers_ready", workers=len(self._slots))
                self._notifier.ready(self._status_line())
                if self._resumed is not None:
                    self._log_handoff_complete(self._resumed)
        elif kind == Up.HANDOFF_FAILED:
            self._handoff_failed(slot, str(message.get("error")))
        elif kind == Up.RELOADED:
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
        fields = {
            "worker": slot.index,
            "pid": slot.pid,
            "connections": slot.stats.get("connections", 0),
            "lived_s": round(lived, 1),
            "reason": "unresponsive" if slot.state is State.KILLED else None,
            **how,
        }
        if slot.link is not None:
            slot.link.on_event(select.EPOLLIN)  # what it sent last (a handoff) comes first
            self.reactor.close(slot.link)
            slot.link = None
        # After its last messages: a handover among them retired its final count already,
        # so the heartbeat before it must not be added as well.
        self.sums.retire(slot)
        slot.pid = None
        was = slot.state
        slot.apply(Event.EXIT)
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
        if was is State.HANDED_OVER:  # nothing went with it
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
        slot.apply(Event.BACK_OFF)

    def _check_workers(self) -> None:
        """Kill a worker whose loop stopped checking in (SIGSTOP, a hang): it is replaced."""
        now = self.reactor.now
        for slot in self._live():
            # One a handoff round waits for has the round's deadline: it may yet hand over.
            if slot.state in AWAITING_ANSWER or slot.state is State.KILLED:
                continue
            silent_s = now - slot.heard_at
            if silent_s > self.worker_timeout_s:
                slot.apply(Event.KILL)
                log.error(
                    "worker_unresponsive",
                    worker=slot.index,
                    pid=slot.pid,
                    silent_s=round(silent_s, 1),
                    connections=slot.stats.get("connections", 0),
                )
                _kill(slot.pid, signal.SIGKILL)

    def live_problem(self) -> str | None:
        """/healthz and the watchdog ping: every worker has checked in within its
        timeout (one killed as unresponsive counts as silent until it is reaped)."""
        now = self.reactor.now
        for slot in self._live():
            silent_s = now - slot.heard_at
            if slot.state is State.KILLED or silent_s > self.worker_timeout_s:
                return f"worker {slot.index} silent for {silent_s:.1f} s"
        return None

    def ready_problem(self) -> str | None:
        """/readyz: the process's own answer, then every worker ready."""
        problem = super().ready_problem()
        if problem is not None:
            return problem
        for slot in self._slots:
            if slot.state not in SAID_READY:
                return f"worker {slot.index} {slot.state.value}"
        return None

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
            if self._handoff.defer_stop(signum):
                log.info("shutdown_deferred", signal=signal.Signals(signum).name)
            return
        self._stopping = self.readiness.stopping = True
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
        self._cancel_respawns()
        # Our copies go first: when a worker closes its own, the socket is closed. The
        # metrics endpoint stays until the end: /readyz answers 503 through the drain.
        self._close_listeners()
        for slot in self._slots:
            if slot.state is State.SERVING:  # one still starting is told once it is ready
                self._terminate(slot)
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
        destination = self._handoff_destination()
        if destination is None:
            return
        self._cancel_respawns()  # a slot in back-off starts afresh in the next process
        round_ = HandoffRound(destination, handoff.now_monotonic(), self._slots)
        round_.ask(lambda s: s.link is not None and s.link.send(Down.HAND_OVER))
        self._handoff = round_
        asked = len(round_.asked)
        log.info("handoff_started", workers=asked, route=type(destination).__name__)
        self._notifier.status(f"handing over: {asked} workers")
        round_.timer = self.reactor.call_later(HANDOFF_WAIT_S, self._handoff_timeout)
        self._handoff_progress()

    def _handed_over(self, slot: Slot, message: dict[str, Any], fds: list[int]) -> None:
        names = [str(n) for n in message.get("names") or []]
        if not slot.allows(Event.HAND_OVER) or len(names) != len(fds):
            log.warning("worker_handoff_unexpected", worker=slot.index)
            close_all(fds)
            return
        # Late too (a stuck worker that woke after its round was given up): the worker
        # has let go, so these are the only copies, and its successor takes them back.
        round_ = self._handoff
        late = round_ is None or slot.state not in AWAITING_ANSWER
        slot.handoff = list(zip(names, fds, strict=True))
        slot.apply(Event.HAND_OVER)
        # Its successor restores these totals and reports only what it counts itself.
        self.sums.retire(slot, message.get("counters") or {})
        log.info("worker_handed_over", worker=slot.index, pid=slot.pid, late=late)
        if round_ is not None:
            self._handoff_progress()

    def _handoff_failed(self, slot: Slot, error: str) -> None:
        round_ = self._handoff
        if round_ is None:
            return
        round_.fail(slot, error)
        self._handoff_progress()

    def _handoff_timeout(self) -> None:
        round_ = self._handoff
        if round_ is None:
            return
        for slot in round_.expire():  # handed over but still alive: its descriptors are ours
            slot.apply(Event.KILL)
            _kill(slot.pid, signal.SIGKILL)
        self._handoff_progress()

    def _handoff_progress(self) -> None:
        """Go on once every worker answered and those that handed over have exited."""
        round_ = self._handoff
        if round_ is None or not round_.over:
            return
        round_.end()
        self._complete_handoff(round_)

    def _complete_handoff(self, round_: HandoffRound) -> None:
        if round_.stop_signal is not None:  # the stop wins: the connections come back, drain
            log.info("handoff_cancelled", reason="stopping")
            self._give_back()
            self._on_stop_signal(round_.stop_signal)
            return
        blocked = round_.blocked()
        if blocked is not None:
            self._abort_handoff(blocked)
            return
        meta = {
            **self.handoff_meta(round_.signal_at),
            "workers": len(self._slots),
            "supervisor": {
                "started_at": self.sums.started_at,
                "reloads": self.counters.reloads,
                # Every worker's count so far: the next workers report only their own.
                "totals": self.totals().to_dict(),
            },
        }
        try:
            round_.send_state(self.listener_set, self._handoff_sources, meta)
        except handoff.HandoffError as e:
            self._abort_handoff(str(e))
            return
        self._handoff = None
        self.handed_over = True
        serving = self._live()
        if serving:  # under systemd, and they could not hand over: they drain, then we go
            log.warning("handoff_partial", draining=[s.index for s in serving])
            self._stopping = self.readiness.stopping = True
            for slot in serving:
                if slot.state in (State.STARTING, State.SERVING):  # a killed one is going
                    self._terminate(slot)
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
        if round_ is not None:
            round_.end()
        for slot in self._slots:
            if slot.state is State.EMPTY:
                self._spawn(slot)

    def _log_handoff_complete(self, resumed: handoff_workers.Resumed) -> None:
        # Forking the workers, each receiving and restoring its predecessor's
        # connections (their own handoff_complete lines break it down), up to READY=1.
        resumed.steps["workers_restore"] = round(handoff.now_monotonic() - resumed.resumed_at, 4)
        log_handoff_complete(
            sum(slot.restored for slot in self._slots),
            {"workers": len(self._slots)},
            old_version=resumed.old_version,
            old_pid=resumed.old_pid,
            signal_at=resumed.signal_at,
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

    def _terminate(self, slot: Slot) -> None:
        """SIGTERM: the worker drains its connections and exits."""
        slot.apply(Event.TERMINATE)
        _kill(slot.pid, signal.SIGTERM)

    def _cancel_respawns(self) -> None:
        for slot in self._slots:
            if slot.state is State.WAITING and slot.respawn is not None:
                slot.respawn.cancel()
                slot.respawn = None
                slot.apply(Event.CANCEL)

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
        packet = link.config_packet(new)
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
        self.reconfigure_endpoints(old, new)
        self._reload_timer = self.reactor.call_later(REPLY_WAIT_S, self._reload_done)
        if not self._reload_waiting:
            self._reload_done()

    def _send_reload(self, slot: Slot, link: WorkerLink[Slot], plan: Plan, packet: bytes) -> bool:
        """The slot's new sockets (SCM_RIGHTS), then the configuration that lists them."""
        added = plan.added[slot.index - 1]
        if added:
            records = [listener_set.describe(listener) for listener in added]
            message = Down.LISTENERS + json.dumps(records).encode()
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
        self._stats_waiting = {s for s in self._live() if s.link and s.link.send(Down.STATS)}
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

    # -- reporting (workers/sums.py) ------------------------------------------------

    def totals(self) -> Counters:
        return self.sums.totals()

    def stats(self, totals: Counters | None = None) -> dict[str, Any]:
        return self.sums.stats(self.reactor.now, totals)

    def _log_stats(self) -> None:
        log.info("stats", **self.stats())

    def snapshot(self) -> Snapshot:
        proxy = any(lst.proxy_protocol for lst in self._slots[0].listeners)
        return self.sums.snapshot(self.reactor.now, proxy, self._tls_certificates())

    def _tls_certificates(self) -> dict[str, float] | None:
        """The served certificates' notAfter, read from the files (the workers hold the
        contexts); None without a TLS listener (ssl is then not imported)."""
        files = tls_certificate_files(self._config)
        if not files:
            return None
        from epolld.tls import certs

        return certs.expiries(files)

    def open_connections(self) -> int:
        """From the workers' last heartbeats (at most heartbeat_s old)."""
        return sum(int(slot.stats.get("connections", 0)) for slot in self._live())

    def _capacity(self) -> int:
        return self._config.limits.max_connections * len(self._slots)

    def _status_line(self) -> str:
        names = " ".join(sorted({lst.name for lst in self._slots[0].listeners}))
        return self.sums.status_line(self.reactor.now, names)

    # -- closing -------------------------------------------------------------------

    def _close_listeners(self) -> None:
        for listener in self.listener_set.unique():
            listener.close()

    def _serve_metrics(self) -> None:
        listener = self.listener_set.metrics
        assert listener is not None
        self._metrics = self._metrics_endpoint(listener)
        log.info("metrics_listening", address=listener.name)

    def _close_everything(self) -> None:
        self.close_endpoints()
        for slot in self._live():  # only if the loop itself failed: leave no orphans
            _kill(slot.pid, signal.SIGKILL)
        self._close_listeners()
        self._stop_metrics()
        self.reactor.release()


def _kill(pid: int | None, signum: int) -> None:
    if pid is None:
        return
    try:
        os.kill(pid, signum)
    except OSError as e:
        if e.errno != errno.ESRCH:
            raise
