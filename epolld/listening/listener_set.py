"""Every listening socket of the daemon for 1 to N slots, matched to the file in one place.

A slot is what one worker serves; a single process is one slot. A TCP or UDP address is
one SO_REUSEPORT socket per slot (with more than one), a Unix address or a socket from
systemd one socket in every slot (`Listener.shared`). The metrics endpoint's socket is
here too, once. As nginx's ngx_init_cycle() does for a reload and a binary upgrade alike,
`plan()` pairs the file's addresses with the sockets held and binds what is new: a plan
(added per slot, removed, followed) that `commit()` applies only once everything is bound,
so that a file that cannot be applied changes nothing.

Sockets travel as records (`describe()`, `from_record()`): down a worker's socketpair at
a reload (worker.py; `HandedDown` is then the worker's way to "bind"), and in the handoff
state (`slot_listener`, `metrics_listener`: handoff_workers.py).
"""

from __future__ import annotations

import dataclasses
import errno
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from epolld.config import Config, ListenAddress
from epolld.errors import BindError, EpolldError
from epolld.listening import activation
from epolld.listening import sockets as listeners
from epolld.listening.sockets import Listener

if TYPE_CHECKING:
    from epolld.handoff import Restorer, State, StateWriter

log = structlog.get_logger("epolld")

# address, backlog, reuseport -> a bound listener (raises BindError)
Binder = Callable[[ListenAddress, int, bool], Listener]

# A listener's kind: what serves it (service.py registers each with its handler: a
# Listener accepts, udp.UdpEndpoint echoes datagrams, metrics.MetricsEndpoint answers
# HTTP, a TLS listener accepts TLS connections: tls/). A new kind is one module and one
# entry here and in the service's table.
STREAM, UDP, METRICS, TLS = "stream", "udp", "metrics", "tls"


def kind_of(listener: Listener) -> str:
    if listener.is_udp:
        return UDP
    return TLS if listener.tls else STREAM


@dataclass
class Plan:
    """What a new file changes, all bound already; nothing is applied yet."""

    added: list[list[Listener]]  # per slot; a shared socket is in every slot
    removed: list[Listener] = field(default_factory=list)  # each socket once
    followed: list[tuple[Listener, ListenAddress]] = field(default_factory=list)
    old_backlog: int = 0
    new_backlog: int = 0
    metrics_moved: bool = False
    metrics: Listener | None = None  # bound for the new metrics.listen

    def new_listeners(self) -> list[Listener]:
        """Every added socket once."""
        return unique(self.added)

    def discard(self) -> None:
        """Close what was bound for a plan that will not apply."""
        for listener in self.new_listeners():
            listeners.close(listener)
        if self.metrics is not None:
            listeners.close(self.metrics)
        self.added = [[] for _ in self.added]
        self.metrics = None


class ListenerSet:
    """The listening sockets of `len(slots)` slots, and the metrics endpoint's.

    Args:
        slots: per slot, the listeners it serves (a shared one is in every list).
        metrics: the metrics endpoint's socket, if bound.
        binder: how a new address is bound (a worker takes what its supervisor sent).
        owns_metrics: False in a worker: the supervisor serves the metrics.
    """

    def __init__(
        self,
        slots: list[list[Listener]],
        metrics: Listener | None = None,
        *,
        binder: Binder = listeners.bind,
        owns_metrics: bool = True,
    ) -> None:
        self.slots = [list(slot) for slot in slots] or [[]]
        self.metrics = metrics
        self._bind = binder
        self.owns_metrics = owns_metrics

    @classmethod
    def open(
        cls,
        config: Config,
        slots: int = 1,
        passed: list[tuple[str, int]] | None = None,
        *,
        taking_over: bool = False,
    ) -> ListenerSet:
        """Adopt systemd's sockets if it passed any (they replace `listen`), else bind
        `listen` in every slot, and metrics.listen; a restart handoff brings its own
        listeners (the service reconciles them), so only systemd's are adopted then.

        Raises:
            BindError: an address could not be bound; none stays bound.
        """
        opened = cls([[] for _ in range(slots)])
        inherited = adopt_inherited(config, passed)
        for listener in inherited:
            opened.add(listener)
        if taking_over:
            return opened
        try:
            if not inherited:
                for address in config.listen:
                    opened._bind_in_every_slot(opened.slots, address, config.backlog)
            opened.metrics = bind_metrics(config)
        except EpolldError:
            opened.close()
            raise
        return opened

    def take_from(self, binder: Binder) -> None:
        """A worker's set: new addresses come from binder (the sockets the supervisor
        sent), and the metrics endpoint is the supervisor's."""
        self._bind = binder
        self.owns_metrics = False

    # -- what is held --------------------------------------------------------------

    def unique(self) -> list[Listener]:
        """Every echo listener once (a shared one is in every slot)."""
        return unique(self.slots)

    @property
    def inherited(self) -> bool:
        """systemd's sockets: `listen` does not apply (socket activation)."""
        return any(listener.inherited for listener in self.unique())

    def add(self, listener: Listener, slot: int | None = None) -> None:
        """Hold a listener (adopted, restored) in one slot (0-based), or every slot."""
        if slot is None:
            if len(self.slots) > 1:
                listener.shared = True
            for each in self.slots:
                each.append(listener)
        else:
            self.slots[slot].append(listener)

    def remove(self, listener: Listener) -> None:
        """Forget a listener in every slot (not closed: its handler closes it)."""
        for slot in self.slots:
            slot[:] = [x for x in slot if x is not listener]

    def close(self) -> None:
        """Close every socket held (at exit, or when opening failed)."""
        for listener in self.unique():
            listeners.close(listener)
        for slot in self.slots:
            slot.clear()
        if self.metrics is not None:
            listeners.close(self.metrics)
            self.metrics = None

    # -- the restart handoff of a supervisor (a single process's listeners are handlers,
    # -- each writing its own record) ---------------------------------------------------

    def write_handoff(self, out: StateWriter) -> None:
        """A "slot_listener" record per socket, naming the slots (from 1) that serve it,
        and the "metrics_listener"."""
        serving: dict[int, list[int]] = {}
        for index, slot in enumerate(self.slots, 1):
            for listener in slot:
                serving.setdefault(id(listener), []).append(index)
        for listener in self.unique():
            record = listener.handoff_state(out)
            if record is not None:
                out.add({**record, "kind": "slot_listener", "slots": serving[id(listener)]})
        if self.metrics is not None:
            record = self.metrics.handoff_state(out)
            if record is not None:
                out.add({**record, "kind": "metrics_listener"})

    def restorers(self) -> dict[str, Restorer]:
        """What write_handoff() wrote, back into this set (slots beyond its own are
        dropped: the next supervisor has as many slots as the last one)."""

        def restore_listener(record: dict[str, Any], state: State) -> None:
            count = len(self.slots)
            indices = [int(i) for i in record["slots"] if 1 <= int(i) <= count]
            listener = Listener.from_handoff(record, state)
            listener.shared = len(indices) > 1
            for index in indices:
                self.slots[index - 1].append(listener)

        def restore_metrics(record: dict[str, Any], state: State) -> None:
            self.metrics = Listener.from_handoff(record, state)

        return {"slot_listener": restore_listener, "metrics_listener": restore_metrics}

    # -- reconciling -----------------------------------------------------------------

    def plan(self, old: Config, new: Config) -> Plan:
        """Pair new's addresses with the sockets held; bind the new ones in every slot.

        A listener is its socket: turning proxy_protocol on or off keeps the socket.
        Binding first means a failure leaves everything as it was: the daemon is never
        without a listener. The price: an address that overlaps one being removed
        (127.0.0.1:7080 -> 0.0.0.0:7080) cannot be bound in the same reload.

        Raises:
            BindError: nothing was changed (what was bound is closed again).
        """
        plan = Plan([[] for _ in self.slots], old_backlog=old.backlog, new_backlog=new.backlog)
        held = self.unique()
        try:
            if self.inherited:
                if new.listen != old.listen:
                    log.warning(
                        "listen_ignored", reason="sockets come from systemd socket activation"
                    )
            else:
                for listener in held:
                    listeners.match_bound_port(listener, new.listen)
                current = {listeners.socket_of(x.address) for x in held if x.address is not None}
                wanted = {listeners.socket_of(a): a for a in new.listen}
                for key, address in wanted.items():
                    if key not in current:
                        self._bind_in_every_slot(plan.added, address, new.backlog, held)
                for listener in held:
                    if listener.address is None:
                        continue
                    key = listeners.socket_of(listener.address)
                    if key in wanted:
                        plan.followed.append((listener, wanted[key]))
                    else:
                        plan.removed.append(listener)
            if self.owns_metrics:
                wanted_metrics = new.metrics.listen
                if self.metrics is None:
                    plan.metrics_moved = wanted_metrics is not None
                else:
                    plan.metrics_moved = not listeners.is_at(self.metrics, wanted_metrics)
                if plan.metrics_moved:
                    plan.metrics = bind_metrics(new)
        except BaseException:
            plan.discard()
            raise
        return plan

    def commit(
        self,
        plan: Plan,
        release: Callable[[Listener], None] = listeners.close,
        release_metrics: Callable[[Listener], None] = listeners.close,
    ) -> None:
        """Apply a plan: removed sockets are released (their owner unregisters and
        closes them), the others follow the file, the new ones join their slots."""
        closed: dict[str, int] = {}  # address -> sockets (one per slot for REUSEPORT)
        for listener in plan.removed:
            self.remove(listener)
            release(listener)
            closed[listener.name] = closed.get(listener.name, 0) + 1
        for name, sockets in closed.items():
            if len(self.slots) > 1:
                log.info("listener_closed", address=name, sockets=sockets)
            else:
                log.info("listener_closed", address=name)
        for listener, address in plan.followed:
            listeners.follow(listener, address, plan.old_backlog, plan.new_backlog)
        for slot, more in zip(self.slots, plan.added, strict=True):
            slot.extend(more)
        if plan.metrics_moved:
            if self.metrics is not None:
                release_metrics(self.metrics)
            self.metrics = plan.metrics

    def _bind_in_every_slot(
        self,
        slots: list[list[Listener]],
        address: ListenAddress,
        backlog: int,
        held: list[Listener] | None = None,
    ) -> None:
        """Add address to every slot: one socket (Unix, or a single slot), or one
        SO_REUSEPORT socket per slot on the same port.

        Raises:
            BindError: what was bound for this address is closed again.
        """
        many = len(slots) > 1
        if address.family == "unix" or not many:
            listener = self._bind_beside(address, backlog, False, held or [])
            if many:
                listener.shared = True
            for slot in slots:
                slot.append(listener)
            return
        group = [self._bind_beside(address, backlog, True, held or [])]
        try:
            # Port 0: the others join the port the kernel chose for the first.
            same = dataclasses.replace(address, port=group[0].sock.getsockname()[1])
            for _ in slots[1:]:
                group.append(self._bind(same, backlog, True))
                group[-1].address = address  # as configured: a reload compares with it
        except EpolldError:
            for listener in group:
                listeners.close(listener)
            raise
        for slot, listener in zip(slots, group, strict=True):
            slot.append(listener)

    def _bind_beside(
        self, address: ListenAddress, backlog: int, reuseport: bool, held: list[Listener]
    ) -> Listener:
        """Bind a new address; if one of our own listeners holds its port, say so."""
        try:
            return self._bind(address, backlog, reuseport)
        except BindError as e:
            if e.errno == errno.EADDRINUSE and address.family != "unix":
                # The bound port, not the configured one, which may be 0.
                ours = sorted(
                    {
                        x.name
                        for x in held
                        if x.sock.family != socket.AF_UNIX
                        and x.is_udp == address.is_udp
                        and x.sock.getsockname()[1] == address.port
                    }
                )
                if ours:
                    raise BindError(
                        f"cannot listen on {address}: it overlaps {', '.join(ours)}, which "
                        "this daemon holds; remove that in one reload and add this in the "
                        "next, or restart",
                        errno=e.errno,
                    ) from None
            raise


def unique(slots: list[list[Listener]]) -> list[Listener]:
    """Every listener once (a shared one is in every slot)."""
    return list({id(item): item for slot in slots for item in slot}.values())


def adopt_inherited(config: Config, passed: list[tuple[str, int]] | None) -> list[Listener]:
    """systemd's sockets (socket activation), which replace `listen`; [] if none came."""
    inherited = activation.adopt_sockets(activation.passed_fds() if passed is None else passed)
    if inherited:
        log.info(
            "listen_ignored",
            reason="sockets come from systemd socket activation",
            listen=[str(a) for a in config.listen],
        )
    # The same name matching for PROXY and TLS: str(address) is what describe_socket() says.
    configured = {
        str(a): a for a in config.listen if a.proxy_protocol or a.tls or a.service != "echo"
    }
    return [listeners.adopt(sock, configured) for _, sock in inherited]


def bind_metrics(config: Config) -> Listener | None:
    """Bind metrics.listen, if set.

    Raises:
        BindError: the address could not be bound.
    """
    if config.metrics.listen is None:
        return None
    from epolld.observability import metrics  # prometheus_client: only loaded when metrics are on

    return metrics.bind(config.metrics.listen)


# -- sockets sent down a worker's socketpair ---------------------------------------------


def describe(listener: Listener) -> dict[str, Any]:
    """What a worker needs to serve a socket sent to it, beside the descriptor."""
    address = listener.address
    return {
        "address": dataclasses.asdict(address) if address is not None else None,
        "name": listener.name,
        "shared": listener.shared,
        "proxy_protocol": listener.proxy_protocol,
    }


def from_record(record: dict[str, Any], fd: int) -> Listener:
    """The listener a worker received (the supervisor removes a Unix socket's file)."""
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    address = record.get("address")
    return Listener(
        sock,
        ListenAddress(**address) if address is not None else None,
        str(record["name"]),
        shared=bool(record.get("shared")),
        keep_path=True,
        proxy_protocol=bool(record.get("proxy_protocol")),
    )


class HandedDown:
    """A worker's binder: the sockets its supervisor bound and sent for the next
    configuration, by address (a worker never binds: see supervisor.py)."""

    def __init__(self) -> None:
        self._waiting: dict[ListenAddress, Listener] = {}

    def put(self, listener: Listener) -> None:
        if listener.address is None:
            listeners.close(listener)
            return
        stale = self._waiting.pop(listeners.socket_of(listener.address), None)
        if stale is not None:
            listeners.close(stale)
        self._waiting[listeners.socket_of(listener.address)] = listener

    def __call__(self, address: ListenAddress, backlog: int, reuseport: bool) -> Listener:
        listener = self._waiting.pop(listeners.socket_of(address), None)
        if listener is None:
            raise BindError(f"cannot listen on {address}: the supervisor sent no socket for it")
        return listener

    def clear(self) -> None:
        """Close what a reload did not take (a later one gets sockets of its own)."""
        for listener in self._waiting.values():
            listeners.close(listener)
        self._waiting.clear()
