"""Taking over from the previous process after a restart handoff (epolld/handoff.py is the
transport): the state chosen among what systemd or the re-exec passed, the configuration
it ran, the store cleared of what nobody takes, and the rule that a process which ends up
without a single listener never reports READY=1.

A single process restores the state into its EchoService (`take_over()`); a supervisor's
state rebuilds its slots first (`resume_supervisor()`), and each slot's first worker then
restores its predecessor's transport.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import structlog

from epolld import config as config_mod
from epolld import handoff
from epolld.config import Config
from epolld.errors import BindError, ConfigError, EpolldError
from epolld.listening import sockets
from epolld.listening.listener_set import ListenerSet, adopt_inherited
from epolld.pidfile import PidFile
from epolld.systemd import Notifier
from epolld.workers import handoff as handoff_workers

if TYPE_CHECKING:
    from epolld.service.echo import EchoService

log = structlog.get_logger("epolld")


class Takeover:
    """What a process started by a restart handoff carries into its service."""

    def __init__(
        self,
        state: handoff.State,
        previous: Config | None,
        config_error: EpolldError | None,
        started_at: float | None,
        received_s: float,
    ) -> None:
        self.state = state
        self.previous = previous
        self.config_error = config_error
        self.started_at = started_at
        self.received_s = received_s
        self.pidfiles: list[PidFile] = []

    @property
    def operator_drain(self) -> bool:
        """An operator's drain (epolld --drain) the previous process was under: it lasts."""
        return self.state.document.get("operator_drain") is True

    @property
    def of_supervisor(self) -> bool:
        """Written by a supervisor (workers: > 1): its slots come back, not one service."""
        return handoff_workers.is_supervisor_state(self.state)

    def restore_pidfile(self, record: dict[str, Any], state: handoff.State) -> None:
        lock = PidFile(str(record["path"]))
        lock.adopt(state.take_fd(record["fd"]))
        self.pidfiles.append(lock)


def previous_config(state: handoff.State | None, current: Config | None) -> Config | None:
    """The configuration the previous process ran, from its handoff state (or None)."""
    if state is None or "config" not in state.document:
        return None
    source = state.document.get("config_source") or (current.source if current else "")
    try:
        return config_mod.parse_config(str(state.document["config"]), str(source))
    except ConfigError:
        return None  # written by another version: the current file must do


def clear_leftovers(state: handoff.State, notifier: Notifier) -> None:
    """Remove from the store what no one will take over: other handoffs' leftovers (a
    process killed while storing), and a transport without records. Else the store
    would pass them again with every restart."""
    if state.leftovers:
        log.warning(
            "handoff_leftovers_removed",
            names=state.leftovers,
            closed=state.leftovers_closed,
            reason="left in the store by a handoff that did not complete",
        )
    for name in [*state.leftovers, *([] if state.records else state.transport)]:
        notifier.remove_fd(name)


def check_listening(served: int) -> None:
    """After a takeover: a service without a single listener must not report READY.

    Raises:
        BindError: none was taken over and none could be bound.
    """
    if not served:
        raise BindError("no listener was handed over and none could be bound")


def take_over(service: EchoService, takeover: Takeover, config: Config, notifier: Notifier) -> None:
    """Restore what the previous process handed over, clear the store of it, and bring
    the listeners in line with the configuration now in force.

    Raises:
        BindError: the service would listen on nothing.
    """
    service.restore_handoff(
        takeover.state,
        {"pidfile": takeover.restore_pidfile},
        started_at=takeover.started_at,
        received_s=takeover.received_s,
    )
    for name in takeover.state.transport:
        notifier.remove_fd(name)  # consumed: the store must not hand it over again
    if takeover.config_error is None:
        try:
            service.reconcile_after_handoff(takeover.previous or config)
        except EpolldError as e:
            log.error("handoff_listeners_kept", error=str(e))
    stats = service.stats()
    check_listening(stats["listeners"] + stats["udp_listeners"])


def resume_supervisor(
    takeover: Takeover,
    config: Config,
    notifier: Notifier,
    passed: list[tuple[str, int]],
) -> tuple[ListenerSet, handoff_workers.Resumed]:
    """A supervisor's restart handoff: the same number of slots on the sockets taken over
    (and those `listen` now adds); each slot keeps its predecessor's transport.

    Raises:
        BindError: the supervisor would listen on nothing.
    """
    state = takeover.state
    resumed = handoff_workers.resume(
        state,
        adopt_inherited(config, passed),
        {"pidfile": takeover.restore_pidfile},
        received_s=takeover.received_s,
        started_at=takeover.started_at,
    )
    for name in state.transport:
        notifier.remove_fd(name)  # consumed: the store must not hand it over again
    if config_mod.worker_count(config) != len(resumed.slots):
        # Fewer slots would close REUSEPORT sockets, resetting the connections they queue.
        log.warning(
            "handoff_kept",
            settings=["workers"],
            workers=len(resumed.slots),
            reason="a restart handoff keeps its workers; stop and start epolld to apply this",
        )
    held = ListenerSet(resumed.slots, resumed.metrics_listener)
    if takeover.config_error is None:
        try:
            # A single process's rules: added addresses bound in every slot, removed ones
            # closed (their connections stay with their workers), a moved metrics rebound.
            plan = held.plan(takeover.previous or config, config)
            held.commit(plan, release_metrics=_close_metrics)
        except EpolldError as e:
            log.error("handoff_listeners_kept", error=str(e))
    check_listening(len(held.unique()))
    return held, resumed


def _close_metrics(listener: sockets.Listener) -> None:
    log.info("metrics_closed", address=listener.name)  # as a single process says it
    sockets.close(listener)
