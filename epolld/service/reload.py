"""A new configuration, as one step or not at all (SIGHUP, a worker's reload, the
listeners after a restart handoff): the listener set plans the new file (binding what is
new), the plan is committed (removed sockets close, new ones are served, a moved metrics
endpoint serves on its new socket), then every part takes the new settings.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import structlog

from epolld import config as config_mod
from epolld.config import Config
from epolld.core.counters import Counters
from epolld.errors import EpolldError
from epolld.listening.listener_set import ListenerSet
from epolld.listening.sockets import Listener
from epolld.observability import logsetup
from epolld.service.admission import Admission
from epolld.systemd import Notifier
from epolld.udp.endpoint import UdpEndpoints

if TYPE_CHECKING:
    from epolld.listening.listener_set import Plan

log = structlog.get_logger("epolld")


class Reloaded(Protocol):
    """What a reload calls back in the service that wires the parts."""

    def serve(self, listener: Listener) -> None:
        """Serve a new listening socket by its kind (TCP and Unix, UDP)."""

    def serve_metrics(self, listener: Listener) -> None:
        """Serve the metrics endpoint on listener (the old one, if any, stopped)."""

    def release_metrics(self, listener: Listener) -> None:
        """Close a removed or moved metrics socket (its endpoint, if serving)."""

    def switch(self, new: Config) -> None:
        """Every part takes the new settings."""

    def prepare_tls(self, new: Config) -> Callable[[], None] | None:
        """Read the new certificates and keys (ConfigError if one cannot be used); the
        call returned puts them in force. None without TLS."""

    def refresh_tls(self) -> None:
        """The listeners that stay take their TLS settings from the file in force."""


class Reload:
    """Apply a configuration to the service's listeners and parts.

    Args:
        config: the configuration in force.
        notifier: sd_notify (RELOADING=1, READY=1).
        source: loads the file on SIGHUP; returns the new Config or raises ConfigError.
        counters: the totals (reloads, by outcome).
        listener_set: every listening socket; plans and commits.
        admission, udp: release the sockets a reload removes.
        service: serves new sockets and switches the parts' settings.
    """

    def __init__(
        self,
        config: Config,
        notifier: Notifier,
        source: Callable[[], Config] | None,
        counters: Counters,
        listener_set: ListenerSet,
        admission: Admission,
        udp: UdpEndpoints,
        service: Reloaded,
    ) -> None:
        self.config = config
        self._notifier = notifier
        self._source = source
        self.counters = counters
        self._listener_set = listener_set
        self._admission = admission
        self._udp = udp
        self._service = service

    def reload(self, status_line: Callable[[], str]) -> str | None:
        """Load the configuration from the reload source and apply it, or keep the old one
        (SIGHUP; a worker process calls it when its supervisor sends a configuration).

        Returns:
            None when applied (or nothing to do), else why the old configuration stays.
        """
        if self._admission.stopping or self._source is None:
            return None
        self._notifier.reloading()
        try:
            self.apply(self._source())
        except EpolldError as e:  # the old configuration stays in force
            self.counters.count_reload(ok=False)
            log.error("config_reload_failed", error=str(e))
            self._notifier.ready(f"reload failed, running on the previous configuration: {e}")
            return str(e)
        self.counters.count_reload(ok=True)
        self._notifier.ready(status_line())
        return None

    def apply(self, new: Config) -> None:
        """Switch to a new configuration as one step, or raise and change nothing.

        Raises:
            BindError: a new address could not be bound; the old listeners stay.
        """
        old = self.config
        # Certificates and keys are read again first: a file that cannot be used now
        # refuses the whole reload (ConfigError) before anything changed.
        tls_in_force = self._service.prepare_tls(new)
        plan = self._listener_set.plan(old, new)
        if tls_in_force is not None:
            tls_in_force()
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
        self.config = new
        self._service.switch(new)

    def reconcile_after_handoff(self, previous: Config) -> None:
        """Bind what the configuration now lists and the old process did not, and close
        the handed-over listeners it no longer lists (a reload's rules); the metrics
        listener stays if metrics.listen still names it.

        Raises:
            BindError: a new address could not be bound; the handed-over listeners stay.
        """
        plan = self._listener_set.plan(previous, self.config)
        self._apply_listeners(plan, self.config, before_start=True)

    def _apply_listeners(self, plan: Plan, config: Config, *, before_start: bool = False) -> None:
        """Commit a plan of the listener set: removed sockets leave the reactor, new ones
        are served, a moved metrics endpoint serves on its new socket (announced by
        _started() when this comes before the loop runs)."""
        self._listener_set.commit(plan, self._release_listener, self._service.release_metrics)
        for listener in plan.new_listeners():
            self._service.serve(listener)
            log.info("listening", address=listener.name, fd=listener.fd, trigger=config.trigger)
        if plan.metrics is not None:
            self._service.serve_metrics(plan.metrics)
            if not before_start:
                log.info("metrics_listening", address=plan.metrics.name)
        self._service.refresh_tls()

    def _release_listener(self, listener: Listener) -> None:
        """Stop serving a removed listener and close it (its connections stay)."""
        if listener.is_udp:
            self._udp.remove(listener)
        else:
            self._admission.release_listener(listener)


def _jsonable(value: object) -> object:
    return value if isinstance(value, (str, int, float, bool, type(None), list)) else str(value)
