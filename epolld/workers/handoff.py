"""The restart handoff of a supervisor (workers: > 1): the records of its own state, and
what the next supervisor makes of them.

Besides the meta every state has (configuration, totals, times), a supervisor's holds:

- a "slot_listener" record per socket (Listener.handoff_state), naming the slots that
  serve it: one slot for a SO_REUSEPORT socket, every slot for a shared one;
- a "worker" record per slot whose worker handed over: the FDNAMEs and descriptor indices
  of that worker's own transport (handoff.py). The transport travels nested, its pairs
  still holding the worker's connections in flight; the slot's next worker reads it;
- "metrics_listener", and the daemon's "pidfile" (restored by cli.py).

The shape is kept: the next supervisor runs as many workers as this one did, on these
sockets, whatever the file now says (a stop and start applies `workers` and `listen`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from epolld import handoff
from epolld.listening.listener_set import ListenerSet
from epolld.listening.sockets import Listener
from epolld.workers.slot import Slot


def write_records(out: handoff.StateWriter, slots: list[Slot], sockets: ListenerSet) -> None:
    """Add the supervisor's records to out (the listeners, each handed-over worker)."""
    sockets.write_handoff(out)
    for slot in slots:
        if slot.handoff is not None:
            transport = [[name, out.fd(fd)] for name, fd in slot.handoff]
            out.add({"kind": "worker", "slot": slot.index, "transport": transport})


def is_supervisor_state(state: handoff.State) -> bool:
    return "workers" in state.document


@dataclass
class Resumed:
    """What a supervisor started by a restart handoff takes over."""

    slots: list[list[Listener]]
    transports: dict[int, list[tuple[str, int]]]  # slot index -> its worker's handoff
    metrics_listener: Listener | None
    totals: dict[str, Any]  # the previous supervisor's counters
    signal_at: float | None
    old_pid: int | None
    old_version: str | None
    steps: dict[str, float] = field(default_factory=dict)
    resumed_at: float = 0.0  # from here to READY=1: forking the workers, their restores


def resume(
    state: handoff.State,
    inherited: list[Listener],
    more: dict[str, handoff.Restorer] | None = None,
    received_s: float = 0.0,
    started_at: float | None = None,
) -> Resumed:
    """Rebuild the slots from a supervisor's state; socket-activated listeners
    (inherited, passed again by systemd) are shared by every slot."""
    document = state.document
    count = max(1, int(document["workers"]))
    sockets = ListenerSet([[] for _ in range(count)])
    for listener in inherited:
        listener.shared = True  # systemd's: one socket that every slot serves
        sockets.add(listener)
    transports: dict[int, list[tuple[str, int]]] = {}

    def restore_worker(record: dict[str, Any], state: handoff.State) -> None:
        taken: list[tuple[str, int]] = []
        try:
            for name, index in record["transport"]:
                taken.append((str(name), state.take_fd(int(index))))
        except handoff.HandoffError:
            state.fds.update({-1 - i: fd for i, (_, fd) in enumerate(taken)})  # closed later
            raise
        transports[int(record["slot"])] = taken

    handoff.restore(state, {**sockets.restorers(), "worker": restore_worker, **(more or {})})
    signal_at = document.get("signal_at")
    old_pid = document.get("pid")
    steps = dict(document.get("steps") or {})
    if started_at is not None and isinstance(signal_at, float):
        # The old supervisor's exit (or execv) and this one's interpreter start-up.
        steps["startup"] = round(started_at - signal_at - handoff.wall_time(steps), 4)
    steps["receive"] = round(received_s, 4)
    return Resumed(
        slots=sockets.slots,
        transports=transports,
        metrics_listener=sockets.metrics,
        totals=dict(document.get("supervisor") or {}),
        signal_at=float(signal_at) if isinstance(signal_at, (int, float)) else None,
        old_pid=int(old_pid) if isinstance(old_pid, int) else None,
        old_version=document.get("epolld"),
        steps=steps,
        resumed_at=handoff.now_monotonic(),
    )
