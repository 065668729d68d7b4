"""The echo service: one process's parts, wired. Each part owns its state and is a
module of its own:

- admission.py: the echo listeners, accepting, limits and refusals, the connection
  class (copy or splice), the accounting of every open connection;
- proxied.py: PROXY header readers, and the proxy of each proxied connection;
- drain.py: idle timeouts, and the graceful stop;
- reload.py: a new configuration applied to the listeners and the parts;
- handoff.py: the restart handoff's records out, and the restorers in;
- report.py: stats, the metrics snapshot, STATUS=.

The process around it (signals, run, STATUS= and watchdog timers, the metrics endpoint,
the handoff destination) is process.py's, shared with the supervisor.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from epolld import handoff
from epolld.config import Config
from epolld.core.counters import Counters, Snapshot
from epolld.core.idle import IdleTimer
from epolld.listening.listener_set import STREAM, TLS, UDP, ListenerSet, kind_of
from epolld.listening.sockets import Listener
from epolld.process import HANDOFF_SIGNAL, ProcessShell, is_init, reap_orphans
from epolld.service.admission import Admission
from epolld.service.drain import Drain
from epolld.service.handoff import Handoff
from epolld.service.proxied import Proxied
from epolld.service.reload import Reload
from epolld.service.report import Report
from epolld.services import udp as udp_services
from epolld.systemd import Notifier
from epolld.udp.endpoint import UdpEndpoints

if TYPE_CHECKING:
    from epolld.tls.serving import TlsServing  # imports ssl: only with a TLS listener

log = structlog.get_logger("epolld")


class EchoService(ProcessShell):
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
        super().__init__(config, notifier, reload)
        reactor = self.reactor
        # Totals, updated at accept, close and reload only; live values are added when
        # reporting (snapshot(), stats()). The metrics endpoint reads them at scrape time.
        self.counters = Counters()
        idle = IdleTimer(config.limits.idle_timeout_s)
        self.admission = admission = Admission(reactor, config, self.counters, idle)
        self.proxied = admission.proxied = Proxied(reactor, config, admission)
        self._udp = UdpEndpoints(reactor, config.udp, edge=admission.edge)
        self._udp.service_classes = udp_services.ENDPOINTS
        self._udp.fault_counts = self.counters.faults
        self.drain = Drain(
            reactor, config, notifier, admission, self.proxied, self._udp, idle, self.readiness
        )
        admission.on_drained = self.drain.finish
        self.report = Report(reactor, self.counters, admission, self.proxied, self._udp)
        # Every listening socket, matched to the file on reload (one slot: this process).
        self.listener_set = ListenerSet([list(listeners)], metrics_listener)
        self._reload = Reload(
            config, notifier, reload, self.counters, self.listener_set, admission, self._udp, self
        )
        self.handoff = Handoff(
            reactor,
            notifier,
            self.counters,
            self.listener_set,
            admission,
            self.proxied,
            self._udp,
            self.report,
            self,
        )
        self._handoff_pending = False
        self.on_signals(
            {
                signal.SIGTERM: self.drain.on_stop_signal,
                signal.SIGINT: self.drain.on_stop_signal,
                signal.SIGHUP: self._on_reload_signal,
                signal.SIGUSR1: self._on_stats_signal,
                **({HANDOFF_SIGNAL: self._on_handoff_signal} if handoff_signal else {}),
                # a container's command inherits the namespace's orphans
                **({signal.SIGCHLD: reap_orphans} if is_init() else {}),
            }
        )
        # A listener's kind -> what serves it (listener_set.py).
        self._serve_kind: dict[str, Callable[[Listener], None]] = {
            STREAM: admission.add_listener,
            UDP: self._udp.add,
            TLS: self._serve_tls,
        }
        for listener in listeners:
            self.serve(listener)
        if metrics_listener is not None:
            self.serve_metrics(metrics_listener)

    @property
    def stopping(self) -> bool:
        return self.admission.stopping

    @property
    def listeners(self) -> list[Listener]:
        return self.admission.listeners

    # -- running -------------------------------------------------------------------

    def _started(self) -> None:
        """Signals are handled from here on: tell the world we serve."""
        reap_orphans()  # those that exited before (a re-exec in place keeps PID 1's)
        self._start_timers()
        for listener in [*self.listeners, *self._udp.listeners]:
            log.info(
                "listening",
                address=listener.name,
                fd=listener.fd,
                trigger=self._config.trigger,
                io="copy" if listener.is_udp else self._config.io,  # no splice for UDP
                inherited=listener.inherited,
                **_faults_of(listener),
            )
        if self._metrics is not None:
            log.info("metrics_listening", address=self._metrics.listener.name)
        self._notifier.ready(self._status_line())
        self.readiness.started = True
        self.handoff.log_handoff_complete(self._status_line)

    def _start_timers(self) -> None:
        """The periodic work; each timer reads its interval from the current settings."""
        every = self.reactor.every
        every(lambda: self.drain.idle.tick_s, self.drain.sweep_idle)
        every(lambda: self._config.stats_interval_s or 1.0, self._periodic_stats)
        self._every_status()
        self._every_watchdog(self._notifier.watchdog_interval_s())

    def _close_everything(self) -> None:
        self.close_endpoints()
        self.proxied.close_readers()
        self.drain.close_all()
        self._stop_metrics()
        self.admission.close_listeners()
        self._udp.close_all()
        self.reactor.release()

    def _let_go(self) -> None:
        self.handoff.let_go()

    def stop(self, why: str) -> None:
        """Graceful stop: close listeners, echo what was received, FIN, then exit."""
        self.drain.stop(why)

    # -- serving and reloading ---------------------------------------------------------

    def serve(self, listener: Listener) -> None:
        """Serve a listening socket by its kind."""
        self._serve_kind[kind_of(listener)](listener)

    def _serve_tls(self, listener: Listener) -> None:
        """A TLS listener accepts as a plain one; admission makes TLS connections for it."""
        self.tls_serving(self._config).listen(listener)
        self.admission.add_listener(listener)

    def tls_serving(self, config: Config) -> TlsServing:
        """The TLS part (tls/serving.py), made when a TLS listener is first served: ssl is
        imported only then."""
        if self.admission.tls is None:
            from epolld.tls.serving import TlsServing

            self.admission.tls = TlsServing(self.reactor, self.counters, config)
        return self.admission.tls

    def prepare_tls(self, new: Config) -> Callable[[], None] | None:
        """Read a new file's certificates and keys before anything changes (ConfigError
        if one cannot be used); the returned call puts them in force."""
        if self.admission.tls is None and not any(a.tls for a in new.listen):
            return None
        serving = self.tls_serving(new)
        contexts = serving.prepare(new)
        return lambda: serving.configure(new, contexts)

    def restore_tls_closing(self, record: dict[str, Any], state: handoff.State) -> None:
        """A TLS connection the previous process echoed and closed: send its last bytes."""
        self.tls_serving(self._config).restore_closing(record, state)

    def refresh_tls(self) -> None:
        """Listeners that stay may have turned TLS on or off, or changed certificates."""
        if self.admission.tls is not None or any(lst.tls for lst in self.listeners):
            self.tls_serving(self._config).refresh(self.listeners)

    def serve_metrics(self, listener: Listener) -> None:
        self._metrics = self._metrics_endpoint(listener)
        self.listener_set.metrics = listener

    def release_metrics(self, listener: Listener) -> None:
        if self._metrics is not None and self._metrics.listener is listener:
            self._stop_metrics()
        else:
            listener.close()

    def switch(self, new: Config) -> None:
        """Every part takes a new configuration (a reload applied it to the listeners)."""
        old, self._config = self._config, new
        self.reconfigure_endpoints(old, new)
        self.admission.configure(new)
        self._udp.configure(new.udp, edge=self.admission.edge)
        self.proxied.configure(new)
        self.drain.configure(new)

    def _on_reload_signal(self, signum: int) -> None:
        self.reload()

    def reload(self) -> str | None:
        """Load the configuration from the reload source and apply it, or keep the old one
        (SIGHUP; a worker process calls it when its supervisor sends a configuration).

        Returns:
            None when applied (or nothing to do), else why the old configuration stays.
        """
        return self._reload.reload(self._status_line)

    def apply(self, new: Config) -> None:
        """Switch to a new configuration as one step, or raise and change nothing.

        Raises:
            BindError: a new address could not be bound; the old listeners stay.
        """
        self._reload.apply(new)

    def reconcile_after_handoff(self, previous: Config) -> None:
        """After restore_handoff(): the listeners brought in line with the file in force
        (reload.py).

        Raises:
            BindError: a new address could not be bound; the handed-over listeners stay.
        """
        self._reload.reconcile_after_handoff(previous)

    # -- the restart handoff (service/handoff.py, epolld/handoff.py) -----------------

    def restore_metrics(self, listener: Listener) -> None:
        self._stop_metrics()
        self.serve_metrics(listener)

    def add_handoff_source(self, source: handoff.HandoffSource) -> None:
        """Something outside the reactor whose record travels too (the daemon's pidfile)."""
        self.handoff.sources.append(source)

    def _on_handoff_signal(self, signum: int) -> None:
        if self.admission.stopping:
            log.warning("handoff_refused", reason="stopping already")
            return
        if not self._handoff_pending:  # after this batch: the state is then consistent
            self._handoff_pending = True
            self.reactor.call_soon(self._hand_over_on_signal)

    def _hand_over_on_signal(self) -> None:
        self._handoff_pending = False
        destination = self._handoff_destination()
        if destination is None:
            return
        if not self.hand_over(destination, listeners_travel=True) and self._notifier.enabled:
            # systemd is stopping us either way (and kills at TimeoutStopSec): a
            # graceful drain is the best left to offer the clients.
            self.stop("SIGUSR2")

    def hand_over(
        self, destination: handoff.Destination, *, listeners_travel: bool, processes: int = 1
    ) -> bool:
        """Hand every connection and (if listeners_travel) listener over to destination
        (service/handoff.py; processes: how many share the user's in-flight limit). True
        once delivered: the loop stops and lets go of its copies; False (logged) and the
        service goes on as before."""
        if not self.handoff.hand_over(
            destination, listeners_travel=listeners_travel, processes=processes
        ):
            return False
        # The next process holds everything now: exit without a FIN or an unlinked
        # socket file.
        self.handed_over = self.admission.handed_over = True
        self.reactor.stop()
        return True

    def restore_handoff(
        self,
        state: handoff.State,
        more: dict[str, handoff.Restorer] | None = None,
        *,
        started_at: float | None = None,
        received_s: float = 0.0,
    ) -> dict[str, int]:
        """Take over what the previous process handed over (service/handoff.py)."""
        return self.handoff.restore_handoff(
            state, more, started_at=started_at, received_s=received_s
        )

    # -- reporting (service/report.py) ---------------------------------------------

    def snapshot(self) -> Snapshot:
        return self.report.snapshot()

    def totals(self) -> Counters:
        return self.report.totals()

    def stats(self, totals: Counters | None = None) -> dict[str, Any]:
        return self.report.stats(totals)

    def _status_line(self) -> str:
        return self.report.status_line()

    def open_connections(self) -> int:
        return self.admission.conn_count

    def _on_stats_signal(self, signum: int) -> None:
        self.report.log_stats()

    def _periodic_stats(self) -> None:
        if self._config.stats_interval_s > 0:
            self.report.log_stats()


def _faults_of(listener: Listener) -> dict[str, Any]:
    """The listening line's `faults` field, for a listener that has some."""
    faults = listener.address.faults if listener.address is not None else None
    return {"faults": faults.active()} if faults is not None else {}
