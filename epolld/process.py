"""What a single process (service/echo.py) and the supervisor (workers/supervisor.py)
share: the reactor and its signal table, run and exit, STATUS= and the watchdog timers,
the metrics endpoint, the restart handoff's destination and metadata, and the
handoff_complete line.

`ProcessShell` is a base class: a subclass says what it does at start (`_started`), what
it reports (`stats`, `snapshot`, `_status_line`) and how it lets go after a handoff
(`_let_go`) or closes at the end (`_close_everything`); the shell does the rest the same
way for both.
"""

from __future__ import annotations

import gc
import os
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from epolld import __version__, handoff
from epolld import config as config_mod
from epolld.config import Config
from epolld.core.loop import Reactor
from epolld.errors import EpolldError
from epolld.listening import sockets
from epolld.observability.health import Readiness
from epolld.systemd import Notifier

if TYPE_CHECKING:  # epolld.metrics loads prometheus_client: imported only when metrics are on
    from epolld.control import ControlEndpoint
    from epolld.core.counters import Snapshot
    from epolld.listening.listener_set import ListenerSet
    from epolld.listening.sockets import Listener
    from epolld.observability.agent import AgentEndpoint
    from epolld.observability.metrics import MetricsApp, MetricsEndpoint

log = structlog.get_logger("epolld")

STATUS_EVERY_S = 5.0  # STATUS= refresh for systemctl status
HANDOFF_SIGNAL = signal.SIGUSR2  # the unit's RestartKillSignal=; re-exec without systemd
BARRIER_TIMEOUT_S = 10.0  # for systemd to take the handoff's descriptors into its store


class ProcessShell:
    """The process around a service or a supervisor.

    Args:
        config: the validated configuration (the subclass replaces it on reload).
        notifier: sd_notify; a no-op outside systemd.
        reload: called on SIGHUP; returns the new Config or raises ConfigError.
    """

    listener_set: ListenerSet  # every listening socket, the metrics endpoint's too

    def __init__(
        self, config: Config, notifier: Notifier, reload: Callable[[], Config] | None
    ) -> None:
        self._config = config
        self._notifier = notifier
        self._reload_source = reload
        self.reactor = Reactor()
        self.handed_over = False  # everything is the next process's: let go, close nothing
        self._metrics_app: MetricsApp | None = None
        self._metrics: MetricsEndpoint | None = None
        # /readyz and the agent check: ready, stopping, drained by the operator.
        self.readiness = Readiness()
        self._agent: AgentEndpoint | None = None  # agent.listen: HAProxy's agent check
        self._control: ControlEndpoint | None = None  # control.socket: epolld --drain
        self._endpoints_open = False

    # -- what a subclass provides ----------------------------------------------------

    def _started(self) -> None:
        """Signals are handled from here on (the reactor calls this once it runs)."""
        raise NotImplementedError

    def stats(self) -> dict[str, Any]:
        raise NotImplementedError

    def snapshot(self) -> Snapshot:
        """The metrics endpoint's view, read once per scrape."""
        raise NotImplementedError

    def _status_line(self) -> str:
        raise NotImplementedError

    def _let_go(self) -> None:
        """After a handoff: close our copies only (no FIN, no unlinked socket file)."""
        raise NotImplementedError

    def _close_everything(self) -> None:
        raise NotImplementedError

    def open_connections(self) -> int:
        """Client connections open now (every worker's), for the agent's weight."""
        raise NotImplementedError

    def _capacity(self) -> int:
        """limits.max_connections times the number of processes that accept."""
        return self._config.limits.max_connections

    # -- running -------------------------------------------------------------------

    def on_signals(self, table: dict[int, Callable[[int], None]]) -> None:
        """Dispatch each signal to its method (recorded by the handler, run by the loop)."""
        for signum, fn in table.items():
            self.reactor.on_signal(signum, fn)

    def run(self) -> int:
        """Report readiness and serve until stopped. Returns 0.

        Raises:
            BindError: agent.listen or control.socket cannot be bound.
        """
        self._open_endpoints()
        _collect_oldest_less_often()
        try:
            self.reactor.run(started=self._started)
            if not self.handed_over:
                # The endpoint answered /readyz with 503 through the drain; it closes before
                # the last line, so that shutdown_complete stays the last thing logged.
                self._stop_metrics()
                log.info("shutdown_complete", **self.stats())
        finally:
            if self.handed_over:
                self._let_go()
            else:
                self._close_everything()
        return 0

    def _every_status(self) -> None:
        """Refresh STATUS= for systemctl status, under systemd only."""
        if self._notifier.enabled:
            self.reactor.every(lambda: STATUS_EVERY_S, self._send_status)

    def _send_status(self) -> None:
        line = self._status_line()
        if self.readiness.operator_drain:  # systemctl status says so
            line = f"drained by the operator (epolld --undrain ends it); {line}"
        self._notifier.status(line)

    def _every_watchdog(self, interval_s: float | None) -> None:
        """WATCHDOG=1 from the loop itself, not a thread: a stuck loop stops pinging."""
        if interval_s:
            every_s = interval_s
            self.reactor.every(lambda: every_s, self._watchdog_ping)

    def _watchdog_ping(self) -> None:
        if self._config.watchdog and self._healthy():
            self._notifier.watchdog_ping()

    def _healthy(self) -> bool:
        """Whether this process may ping the watchdog (a supervisor asks its workers)."""
        return self.live_problem() is None

    # -- health (observability/health.py) ------------------------------------------

    def live_problem(self) -> str | None:
        """/healthz: None while the loop runs (it is answering); a supervisor adds its
        workers' heartbeats."""
        return None

    def ready_problem(self) -> str | None:
        """/readyz: None while new clients are wanted (a supervisor adds its workers)."""
        return self.readiness.problem()

    # -- the metrics endpoint --------------------------------------------------------

    def _metrics_endpoint(self, listener: Listener) -> MetricsEndpoint:
        """Serve metrics on listener from snapshot(); one registry across reloads."""
        from epolld.observability import metrics

        if self._metrics_app is None:
            self._metrics_app = metrics.MetricsApp(
                self.snapshot, self.live_problem, self.ready_problem
            )
        return metrics.MetricsEndpoint(self.reactor, listener, self._metrics_app)

    @property
    def metrics_listener(self) -> Listener | None:
        """The metrics endpoint's socket, while it serves."""
        return self._metrics.listener if self._metrics is not None else None

    def _stop_metrics(self) -> None:
        """Close the endpoint (or its socket, if not served yet) and its clients."""
        if self._metrics is not None:
            log.info("metrics_closed", address=self._metrics.listener.name)
            self._metrics.close()
            self._metrics = None
        elif self.listener_set.metrics is not None:
            self.listener_set.metrics.close()
        self.listener_set.metrics = None

    # -- the agent check and the control socket (main process only) ------------------

    def _open_endpoints(self) -> None:
        """Bind agent.listen and the control socket, in the process systemd and the
        operator see (not in a worker: its listener set does not own the metrics)."""
        if not self.listener_set.owns_metrics:
            return
        self._endpoints_open = True
        try:
            self._serve_agent(self._config)
            self._serve_control(self._config)
        except BaseException:
            self.close_endpoints()
            raise

    def _serve_agent(self, config: Config) -> None:
        if config.agent.listen is None:
            return
        from epolld.observability import agent

        listener = agent.bind(config.agent.listen)
        self._agent = agent.AgentEndpoint(self.reactor, listener, self.agent_line)
        log.info("agent_listening", address=listener.name)

    def _serve_control(self, config: Config) -> None:
        path = config_mod.control_socket_path(config)
        if path is None:
            return
        from epolld import control

        self._control = control.ControlEndpoint(self.reactor, control.bind(path), self.control)
        log.info("control_listening", address=self._control.listener.name)

    def reconfigure_endpoints(self, old: Config, new: Config) -> None:
        """After a reload: rebind what moved (a failure is logged, and it is off until
        the next reload). Before run() (a takeover's reconcile) there is nothing yet."""
        if not self._endpoints_open:
            return
        held = self._agent.listener if self._agent is not None else None
        if not (sockets.is_at(held, new.agent.listen) if held else new.agent.listen is None):
            previous, self._agent = self._agent, None
            self._rebind(previous, self._serve_agent, new, "agent")
        if config_mod.control_socket_path(old) != config_mod.control_socket_path(new):
            previous_control, self._control = self._control, None
            self._rebind(previous_control, self._serve_control, new, "control")

    def _rebind(
        self,
        previous: AgentEndpoint | ControlEndpoint | None,
        serve: Callable[[Config], None],
        new: Config,
        what: str,
    ) -> None:
        if previous is not None:  # first: the new address may be the same port or path
            log.info(f"{what}_closed", address=previous.listener.name)
            previous.close()
        try:
            serve(new)
        except EpolldError as e:
            log.error(f"{what}_bind_failed", error=str(e))

    def close_endpoints(self) -> None:
        """At exit: close the agent and control sockets (the control file removed)."""
        for endpoint in (self._agent, self._control):
            if endpoint is not None:
                endpoint.close()
        self._agent = self._control = None

    def endpoint_listeners(self) -> list[Listener]:
        """The agent and control sockets: they do not travel in a restart handoff."""
        return [e.listener for e in (self._agent, self._control) if e is not None]

    def agent_line(self) -> str:
        """HAProxy's agent line: `drain`, or `up ready N%` (observability/agent.py)."""
        from epolld.observability import agent

        return agent.answer(self.readiness.draining, self.open_connections(), self._capacity())

    def control(self, command: str) -> dict[str, Any]:
        """An operator's command from the control socket (control.py); the answer."""
        readiness = self.readiness
        if command == "drain" and not readiness.operator_drain:
            readiness.operator_drain = True
            log.warning("drain_started", by="operator", connections=self.open_connections())
        elif command == "undrain" and readiness.operator_drain:
            readiness.operator_drain = False
            log.warning("drain_cancelled", by="operator", connections=self.open_connections())
        if command != "status":
            self._send_status()
        problem = self.ready_problem()
        return {
            "pid": os.getpid(),
            "operator_drain": readiness.operator_drain,
            "stopping": readiness.stopping,
            "ready": problem is None,
            "reason": problem,
            "connections": self.open_connections(),
        }

    # -- the restart handoff -------------------------------------------------------

    def _handoff_destination(self) -> handoff.Destination | None:
        """systemd's fd store under systemd, else a re-exec; None (logged) if neither
        can be had, and the process serves on."""
        try:
            if self._notifier.enabled:
                return handoff.FdStore(self._notifier, BARRIER_TIMEOUT_S)
            return handoff.Reexec()
        except handoff.HandoffError as e:
            log.error("handoff_failed", reason=str(e), action="serve on")
            return None

    def handoff_meta(self, signal_at: float) -> dict[str, Any]:
        """The state document's keys every process writes (the caller adds its totals)."""
        return {
            "epolld": __version__,
            "pid": os.getpid(),
            "signal_at": signal_at,
            "config": config_mod.render_config(self._config),
            "config_source": self._config.source,
            # An operator's drain lasts until cancelled, through restarts too.
            "operator_drain": self.readiness.operator_drain,
        }


def log_handoff_complete(
    connections: int,
    counts: dict[str, Any],
    *,
    old_version: object,
    old_pid: object,
    signal_at: object,
    steps: dict[str, float],
) -> None:
    """The next process's line once it serves: what it took over, from whom, how long
    since the signal (CLOCK_MONOTONIC, shared by every process of a boot)."""
    now = handoff.now_monotonic()
    log.info(
        "handoff_complete",
        connections=connections,
        **counts,
        old_version=old_version,
        new_version=__version__,
        old_pid=old_pid,
        duration_s=round(now - signal_at, 4) if isinstance(signal_at, float) else None,
        steps=steps,
    )


# -- PID 1 ---------------------------------------------------------------------------


def is_init() -> bool:
    """True when this process is PID 1 of its PID namespace (a container's command)."""
    return os.getpid() == 1


def reap_orphans(signum: int = signal.SIGCHLD) -> None:
    """As PID 1, collect every exited child; elsewhere do nothing.

    Orphans anywhere in the PID namespace are re-parented to PID 1 (the background child
    of a probe's or a `podman exec`'s shell): unreaped, each stays a zombie and holds a
    PID. A single process has no child of its own to wait for, so it waits for any; the
    supervisor's SIGCHLD handler already waits for any PID.
    """
    if not is_init():
        return
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:  # no child left
            return
        if pid == 0:  # children left, none exited
            return


# Python collects its oldest generation after every 10 collections of the middle one, and
# each of those walks every open connection's objects: beside 9,000 idle connections a
# round trip cost 7.5% more instructions (callgrind, bench/analysis.md), 2.6% with this.
# A connection is freed by its reference count when it closes; the cycles left (an
# exception's traceback) are young, and the younger generations still collect them.
OLDEST_GENERATION_EVERY = 100


def _collect_oldest_less_often() -> None:
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, OLDEST_GENERATION_EVERY)
