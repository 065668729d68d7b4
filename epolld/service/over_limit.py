"""The client connections a restart handoff cannot carry, and what becomes of them.

Descriptors in flight in SCM_RIGHTS messages count against the *sending user's*
RLIMIT_NOFILE, summed over all of that user's processes, unless the sender has
CAP_SYS_RESOURCE or CAP_SYS_ADMIN (Linux's too_many_unix_fds(): the kernel answers
ETOOMANYREFS past it). The handoff keeps every connection in flight until the next process
receives it, so a user without those capabilities (the unit's DynamicUser) can hand over
at most about RLIMIT_NOFILE connections in all, however many workers hold them: with
`workers: 6` under LimitNOFILE=20000, about 20,000 of 100,000.

Past that, the handoff goes ahead with what fits and the rest stay behind, each with an
answer: what the connection already had to send is sent (what the socket takes at once),
what the client sent and was not read yet is read and dropped (a close with unread input
would be a reset), then a FIN; the old process's exit closes the socket. Counted and
logged once per process (`handoff_over_limit`). A client that sends after that gets a reset
from the kernel, as after any close. Which connections stay behind: each process (a
worker) takes an equal share of the limit, less a reserve for the handoff's own
transports (`budget`), in the order it holds them; if the kernel still refuses (another
process of the user has descriptors in flight too), the rest of that send stays behind,
and batches already sent are taken back until the transport itself can go
(handoff.send).
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
from collections.abc import Iterable
from typing import Final

import structlog

from epolld.tcp.connection import Connection

log = structlog.get_logger("epolld")

# For the transports (a worker's memfd and pairs up to its supervisor, the supervisor's
# own pairs and memfd, the store's messages) and anything else of the user in flight.
RESERVE_FDS: Final = 64
RESERVE_PER_PROCESS_FDS: Final = 8
CAP_SYS_ADMIN: Final = 21
CAP_SYS_RESOURCE: Final = 24
DRAIN_READS: Final = 8  # recv() calls per connection to empty what it has queued


def budget(processes: int) -> int | None:
    """How many descriptors this process may put in flight: an equal share of
    RLIMIT_NOFILE (soft, as the kernel reads it) among processes, less the reserve;
    None when the kernel does not count (CAP_SYS_RESOURCE or CAP_SYS_ADMIN)."""
    if _exempt():
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    share = (soft - RESERVE_FDS - RESERVE_PER_PROCESS_FDS * processes) // max(1, processes)
    return max(0, share)


def _exempt() -> bool:
    """Whether this process has CAP_SYS_RESOURCE or CAP_SYS_ADMIN in effect."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    caps = int(line.split()[1], 16)
                    return bool(caps & (1 << CAP_SYS_RESOURCE | 1 << CAP_SYS_ADMIN))
    except (OSError, ValueError):
        pass
    return False


def close(conns: Iterable[Connection], budget_fds: int | None, reason: str) -> int:
    """Answer every connection that stays behind: its pending output, its unread input
    read and dropped, a FIN. Logs handoff_over_limit once; returns how many."""
    count = 0
    for conn in conns:
        _finish(conn)
        count += 1
    if count:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        log.warning(
            "handoff_over_limit",
            connections=count,
            budget=budget_fds,
            rlimit_nofile=soft,
            reason=reason,
            action="closed with a FIN: pending output sent, unread input dropped",
        )
    return count


def _finish(conn: Connection) -> None:
    sock = conn.sock
    with contextlib.suppress(OSError):
        if conn.HANDOFF_KIND != "tls_closing" and conn.out:  # TLS wrote its own farewell
            sock.send(conn.out)
        pipe_r = getattr(conn, "pipe_r", -1)
        piped = getattr(conn, "piped", 0)
        if pipe_r >= 0 and piped:  # a splice connection: its bytes wait in the pipe
            os.splice(pipe_r, conn.fd, piped, flags=os.SPLICE_F_NONBLOCK)
    with contextlib.suppress(OSError):
        for _ in range(DRAIN_READS):
            if not sock.recv_into(conn.buf):
                break
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
