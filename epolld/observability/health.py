"""/healthz and /readyz on the metrics endpoint, and the state they read.

Two questions a balancer or an orchestrator asks, answered apart:

- live (/healthz): the event loop answers, so it runs; with workers, every worker's
  heartbeat is also within its timeout (the supervisor's condition for WATCHDOG=1, so
  systemd's watchdog and a Kubernetes liveness probe agree on what "stuck" means);
- ready (/readyz): the daemon takes new clients. Not before READY=1 (with workers: before
  every worker said it is ready), and not from the moment it starts draining: a stop
  (SIGTERM, SIGINT) or an operator's drain (`epolld --drain`, control.py). The metrics
  endpoint stays open through a stop's drain so that this 503 is seen.

Each check returns None when all is well, else the reason, which is the 503's body.
Nothing here imports prometheus_client or h11 at import: process.py holds a Readiness
whether or not metrics are on, and the agent check (agent.py) reads it too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # h11: loaded with the metrics endpoint only
    from epolld.observability.http11 import Reply

LIVE_PATH = "/healthz"
READY_PATH = "/readyz"
PATHS = (LIVE_PATH, READY_PATH)

Check = Callable[[], str | None]  # None: all is well; else why not

_TEXT = "text/plain; charset=utf-8"
_NO_CACHE = (("Cache-Control", "no-store"),)


class Readiness:
    """Whether this process wants new clients: ready once, drained by the operator until
    cancelled (the flag travels in the restart handoff: see process.py); a stop is the
    process's own (`stopping`)."""

    def __init__(self) -> None:
        self.started = False  # READY=1 was sent (with workers: every worker is ready)
        self.stopping = False  # a stop's drain began: never ready again
        self.operator_drain = False  # `epolld --drain`, until `epolld --undrain`

    @property
    def draining(self) -> bool:
        """Whether a balancer should send no new clients (the agent says `drain`)."""
        return self.stopping or self.operator_drain

    def problem(self) -> str | None:
        """Why this process is not ready, or None."""
        if self.stopping:
            return "draining: stopping"
        if self.operator_drain:
            return "draining: asked by the operator (epolld --undrain cancels)"
        if not self.started:
            return "starting"
        return None


def reply(path: str, live: Check, ready: Check) -> Reply | None:
    """The answer to a health path (GET or HEAD), or None when path is not one."""
    from epolld.observability.http11 import Reply  # loaded by the endpoint already

    if path == LIVE_PATH:
        problem = live()
    elif path == READY_PATH:
        problem = ready()
    else:
        return None
    if problem is None:
        return Reply(200, _TEXT, b"ok\n", _NO_CACHE)
    return Reply(503, _TEXT, f"{problem}\n".encode(), _NO_CACHE)
