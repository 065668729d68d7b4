"""HAProxy's agent check: `agent-check agent-port N` on a server line makes HAProxy connect
to agent.listen every agent-inter and read one line (HAProxy's configuration manual,
"agent-check"). epolld writes the line and closes:

- `up ready N%` while it serves: N is the share of capacity left, 100 x (1 - open
  connections / (limits.max_connections x workers)), at least 1 (0% would stop new
  clients as a drain does). `ready` cancels a drain the agent asked for earlier (by
  this process, or by the one before a stop and start), so it is in every such line:
  with the agent on, drain through epolld, not HAProxy's own `set server ... state drain`,
  which the next `ready` would cancel;
- `drain` from the moment the daemon drains: a stop (SIGTERM) or an operator's drain
  (`epolld --drain`, control.py). HAProxy then sends it no new client, and the open
  ones finish.

The line is written at accept and the socket closed at once: nothing is kept per client,
nothing is read (HAProxy's `agent-send` is not used; what it sent is dropped). A
connection the agent cannot make is not an error to HAProxy (only its health check marks
a server down), so the listener does not travel in a restart handoff: the next process
binds it again.
"""

from __future__ import annotations

import contextlib
import math
import socket
from collections.abc import Callable

from epolld.config import ListenAddress
from epolld.core.loop import Reactor
from epolld.errors import BindError
from epolld.listening import sockets
from epolld.listening.endpoint import Endpoint
from epolld.listening.sockets import Listener

LISTEN_BACKLOG = 64


def answer(draining: bool, connections: int, capacity: int) -> str:
    """The agent's line for the daemon's state.

    Args:
        draining: a stop or an operator's drain is under way.
        connections: client connections open now (every worker's).
        capacity: limits.max_connections times the number of workers.
    """
    if draining:
        return "drain\n"
    left = 1.0 - connections / capacity if capacity > 0 else 1.0
    percent = max(1, min(100, math.floor(100 * left)))
    return f"up ready {percent}%\n"


class AgentEndpoint(Endpoint):
    """The agent listener on the daemon's reactor: one line to each client, then close
    (listening/endpoint.py accepts).

    Args:
        reactor: the daemon's reactor; the endpoint registers its listener there.
        listener: the bound listening socket; the endpoint owns it from now on.
        line: the line to write now (answer()).
    """

    accept_per_event = 64
    paused_event = "agent_accept_paused"
    failed_event = "agent_accept_failed"

    def __init__(self, reactor: Reactor, listener: Listener, line: Callable[[], str]) -> None:
        self._line = line
        super().__init__(reactor, listener)

    def serve(self, sock: socket.socket) -> None:
        line = self._line().encode()
        with sock, contextlib.suppress(OSError):  # a client gone already: nothing to tell
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sock.recv(1024)  # what HAProxy sent (agent-send): unread, close() resets
            sock.send(line)  # a few bytes into an empty send buffer
            sock.shutdown(socket.SHUT_WR)


def bind(address: ListenAddress) -> Listener:
    """Bind the agent's listening socket.

    Raises:
        BindError: the address cannot be bound; the message names it as agent.listen.
    """
    try:
        return sockets.bind(address, LISTEN_BACKLOG)
    except BindError as e:
        raise BindError(f"agent.listen: {e}", errno=e.errno) from None
