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
from epolld.listening.sockets import Listener
from epolld.workers.slot import Slot


def write_records(
    out: handoff.StateWriter, slots: list[Slot], metrics_listener: Listener | None
) -> None:
    """Add the supervisor's records to out (the listeners, each handed-over worker)."""
    serving: dict[int, list[int]] = {}
    by_id: dict[int, Listener] = {}
    for slot in slots:
        for listener in slot.listeners:
            by_id[id(listener)] = listener
            serving.setdefault(id(listener), []).append(slot.index)
    for key, listener in by_id.items():
        record = listener.handoff_state(out)
        if record is not None:
            out.add({**record, "kind": "slot_listener", "slots": serving[key]})
    for slot in slots:
        if slot.handoff is not None:
            transport = [[name, out.fd(fd)] for name, fd in slot.handoff]
            out.add({"kind": "worker", "slot": slot.index, "transport": transport})
    if metrics_listener is not None:
        record = metrics_listener.handoff_state(out)
        if record is not None:
            out.add({**record, "kind": "metrics_listener"})


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


def resume(
    state: handoff.State,
    inherited: list[Listener],
    more: dict[str, handoff.Restorer] | None = None,
    received_s: float = 0.0,
) -> Resumed:
    """Rebuild the slots from a supervisor's state; socket-activated listeners
    (inherited, passed again by systemd) are shared by every slot."""
    document = state.document
    count = max(1, int(document["workers"]))
    slots: list[list[Listener]] = [list(inherited) for _ in range(count)]
    for listener in inherited:
        listener.shared = True
    transports: dict[int, list[tuple[str, int]]] = {}
    metrics: list[Listener] = []

    def restore_listener(record: dict[str, Any], state: handoff.State) -> None:
        indices = [int(i) for i in record["slots"] if 1 <= int(i) <= count]
        listener = Listener.from_handoff(record, state)
        listener.shared = len(indices) > 1
        for index in indices:
            slots[index - 1].append(listener)

    def restore_worker(record: dict[str, Any], state: handoff.State) -> None:
        taken: list[tuple[str, int]] = []
        try:
            for name, index in record["transport"]:
                taken.append((str(name), state.take_fd(int(index))))
        except handoff.HandoffError:
            state.fds.update({-1 - i: fd for i, (_, fd) in enumerate(taken)})  # closed later
            raise
        transports[int(record["slot"])] = taken

    def restore_metrics(record: dict[str, Any], state: handoff.State) -> None:
        metrics.append(Listener.from_handoff(record, state))

    handoff.restore(
        state,
        {
            "slot_listener": restore_listener,
            "worker": restore_worker,
            "metrics_listener": restore_metrics,
            **(more or {}),
        },
    )
    signal_at = document.get("signal_at")
    old_pid = document.get("pid")
    return Resumed(
        slots=slots,
        transports=transports,
        metrics_listener=metrics[0] if metrics else None,
        totals=dict(document.get("supervisor") or {}),
        signal_at=float(signal_at) if isinstance(signal_at, (int, float)) else None,
        old_pid=int(old_pid) if isinstance(old_pid, int) else None,
        old_version=document.get("epolld"),
        steps={**dict(document.get("steps") or {}), "receive": round(received_s, 4)},
    )
