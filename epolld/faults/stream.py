"""A fault listener's stream (TCP and Unix) connections: where admission and the restart
handoff find them. The echo's classes are in connection.py, discard, chargen and info's
in services.py (which build on connection.py), TLS echo's in tls.py; restore() rebuilds
any of the plain ones from its handoff record (a `connection` record with `faults`).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from epolld.config import Faults
from epolld.faults.connection import (
    EdgeFaultyConnection,
    FaultPlan,
    FaultyConnection,
    fault_class,
)
from epolld.faults.services import service_class

if TYPE_CHECKING:
    from epolld.core.loop import Reactor
    from epolld.handoff import State
    from epolld.tcp.connection import SharedSettings

__all__ = [
    "EdgeFaultyConnection",
    "FaultPlan",
    "FaultyConnection",
    "fault_class",
    "restore",
]


def restore(
    record: dict[str, Any],
    state: State,
    *,
    reactor: Reactor,
    counts: dict[str, int],
    buf: memoryview,
    shared: SharedSettings,
) -> FaultyConnection:
    """A fault connection from its handoff record, with the faults it was accepted with
    (a record naming a service: discard, chargen or info's class)."""
    cls = service_class(record) if record.get("service") else fault_class(bool(record["edge"]))
    conn = cls.from_handoff(record, state, buf=buf, shared=shared)
    assert isinstance(conn, FaultyConnection)
    plan = FaultPlan(Faults(**record["faults"]), reactor, counts, random.Random())
    conn.resume(plan, record, reactor.now)
    return conn
