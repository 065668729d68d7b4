"""systemd socket activation: adopt listening sockets passed in LISTEN_FDS.

The protocol (sd_listen_fds(3)): when LISTEN_PID is our PID, LISTEN_FDS sockets start at fd 3
and LISTEN_FDNAMES names them, colon-separated. The variables are removed afterwards so a child
process cannot mistake them for its own.

How inherited sockets combine with ``listen`` in the config: when systemd passes sockets, they
*replace* ``listen`` entirely. The unit (epolld.socket) owns the addresses then; the config's
``listen`` is still validated but not bound (cli logs that it is ignored). A reload never closes
or re-binds an inherited socket: systemd holds its own copy and would hand the same socket to the
next start, so closing ours would only stop serving it. Mixing the two (inherited plus extra
binds) is deliberately not offered: with epolld.socket the same addresses would be bound twice
and fail with EADDRINUSE.
"""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping

import structlog

from epolld.errors import BindError
from epolld.listening.sockets import describe_socket

log = structlog.get_logger()

SD_LISTEN_FDS_START = 3  # the first passed fd (sd-daemon.h)
_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def inherited_sockets(
    environ: MutableMapping[str, str] | None = None,
) -> list[tuple[str, socket.socket]]:
    """Return (name, socket) for each fd systemd passed, made non-blocking and close-on-exec.

    Only when LISTEN_PID is ours; removes LISTEN_* from environ so children do not inherit
    them. Empty outside socket activation. A name is "unknown" when LISTEN_FDNAMES does not
    name every fd, as in sd_listen_fds_with_names(3).

    Args:
        environ: where LISTEN_* are read and removed; os.environ when None.

    Raises:
        BindError: LISTEN_FDS is not a number, or a passed fd is neither a listening stream
            socket nor an unconnected IPv4/IPv6 datagram socket (ListenDatagram=, served as
            UDP echo); a connected socket is a unit error.
    """
    return adopt_sockets(passed_fds(environ))


def passed_fds(environ: MutableMapping[str, str] | None = None) -> list[tuple[str, int]]:
    """(name, fd) for each descriptor passed in LISTEN_FDS, not yet looked at; removes
    LISTEN_* from environ. The restart handoff (handoff.take_state) picks its own out
    before the rest are adopted as listeners.

    Raises:
        BindError: LISTEN_FDS is not a number.
    """
    environ = os.environ if environ is None else environ
    pid = environ.get("LISTEN_PID")
    count_text = environ.get("LISTEN_FDS")
    names_text = environ.get("LISTEN_FDNAMES")
    for name in _VARIABLES:
        environ.pop(name, None)
    if pid is None or count_text is None:
        return []
    if pid != str(os.getpid()):
        # Meant for another process (e.g. a wrapper that exec'd us after forking).
        log.debug("listen_fds_not_ours", listen_pid=pid, pid=os.getpid())
        return []
    try:
        count = int(count_text)
    except ValueError:
        raise BindError(f"LISTEN_FDS: expected a number, got {count_text!r}") from None
    names = names_text.split(":") if names_text else []
    if len(names) != count:
        names = ["unknown"] * count
    return [(name, SD_LISTEN_FDS_START + offset) for offset, name in enumerate(names)]


def adopt_sockets(passed: list[tuple[str, int]]) -> list[tuple[str, socket.socket]]:
    """Adopt each passed fd as a listening socket.

    Raises:
        BindError: a passed fd is not a listening stream socket.
    """
    adopted: list[tuple[str, socket.socket]] = []
    try:
        for name, fd in passed:
            adopted.append((name, _adopt(fd, name)))
    except BindError:
        for _, sock in adopted:
            sock.close()
        raise
    return adopted


def _adopt(fd: int, name: str) -> socket.socket:
    """Wrap fd without dup'ing it, check it is a socket we can serve, and set its flags."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as e:
        raise BindError(f"inherited fd {fd} ({name}): not a socket: {e.strerror}") from None
    if not (_is_listening_stream(sock) or _is_udp_endpoint(sock)):
        sock.detach()  # not ours to close: leave the fd as systemd gave it
        raise BindError(
            f"inherited fd {fd} ({name}): neither a listening stream socket nor a UDP socket"
        )
    # systemd passes them without O_NONBLOCK (unless NonBlocking=yes) and without FD_CLOEXEC.
    sock.setblocking(False)
    sock.set_inheritable(False)
    log.info("socket_inherited", fd=fd, name=name, address=describe_socket(sock))
    return sock


def _is_listening_stream(sock: socket.socket) -> bool:
    return sock.type == socket.SOCK_STREAM and bool(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    )


def _is_udp_endpoint(sock: socket.socket) -> bool:
    """An unconnected IPv4/IPv6 datagram socket (ListenDatagram= in the .socket unit)."""
    if sock.type != socket.SOCK_DGRAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        sock.getpeername()
    except OSError:
        return True  # ENOTCONN: it takes datagrams from anyone, as a server's must
    return False
