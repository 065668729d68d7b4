"""Bind, adopt and close listening sockets: TCP and UDP over IPv4/IPv6, Unix stream sockets.

A Listener is a reactor handler: an event only tells its owner (the service) that
connections wait; accepting is the owner's policy. A UDP socket is bound here too, but
served by udp.UdpEndpoint, not by a Listener's handler.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import socket
import stat
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from epolld.config import ListenAddress
from epolld.errors import BindError

# Python 3.11 has IPV6_RECVPKTINFO but not IP_PKTINFO (added in 3.12); 8 is Linux's value
# (linux/in.h), the same on every architecture.
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)

if TYPE_CHECKING:
    from epolld.handoff import State, StateWriter


def _not_served(listener: Listener) -> None:
    raise RuntimeError(f"{listener.name}: no owner to accept its connections")


@dataclass(slots=True, eq=False)
class Listener:
    """A listening socket, the address it serves, and the reactor handler for it."""

    sock: socket.socket
    # None: inherited from systemd at an address the file does not mention (socket
    # activation); an inherited socket the file marks proxy_protocol or tls has its entry.
    address: ListenAddress | None
    name: str  # what logs and STATUS show: "127.0.0.1:7080", "[::1]:7080", "unix:/path"
    inherited: bool = False
    # Served by several worker processes from this one socket: registered with
    # EPOLLEXCLUSIVE, so that a connection wakes one worker, not all (see supervisor.py).
    shared: bool = False
    keep_path: bool = False  # a worker's copy: the supervisor removes the Unix socket file
    proxy_protocol: bool = False  # clients start with a PROXY header (proxy.py)
    fd: int = field(init=False)
    mask: int = 0  # set by the owner before registering (level or edge)
    active_at: float = 0.0
    on_ready: Callable[[Listener], None] = _not_served  # connections wait to be accepted

    def __post_init__(self) -> None:
        self.fd = self.sock.fileno()

    def on_event(self, events: int) -> int:
        self.on_ready(self)
        return self.mask

    def close(self) -> None:
        """Close the socket and remove its Unix socket file (an inherited one belongs to
        systemd)."""
        close(self)

    def handoff_state(self, out: StateWriter) -> dict[str, Any] | None:
        """Its record for a restart; None for a socket systemd passes again itself."""
        if self.inherited and out.systemd_keeps_inherited:
            return None
        return {
            "kind": "listener",
            "fd": out.fd(self.fd),
            "address": asdict(self.address) if self.address is not None else None,
            "name": self.name,
            "inherited": self.inherited,
            "proxy_protocol": self.proxy_protocol,
        }

    @classmethod
    def from_handoff(cls, record: dict[str, Any], state: State) -> Listener:
        """The listener again, its backlog intact (it listened all along)."""
        sock = socket.socket(fileno=state.take_fd(record["fd"]))
        sock.setblocking(False)
        address = record["address"]
        return cls(
            sock,
            ListenAddress(**address) if address is not None else None,
            str(record["name"]),
            inherited=bool(record["inherited"]),
            proxy_protocol=bool(record.get("proxy_protocol", False)),
        )

    @property
    def is_tcp(self) -> bool:
        return self.sock.family in (socket.AF_INET, socket.AF_INET6) and not self.is_udp

    @property
    def is_udp(self) -> bool:
        return self.sock.type == socket.SOCK_DGRAM

    @property
    def tls(self) -> bool:
        """Its clients speak TLS (tls/); what the file says of its address."""
        return self.address is not None and self.address.tls


def socket_of(address: ListenAddress) -> ListenAddress:
    """The address without what does not change its socket (the PROXY flag, TLS, the
    service)."""
    return dataclasses.replace(
        address,
        service="echo",
        proxy_protocol=False,
        tls=False,
        tls_certificate=None,
        tls_key=None,
        tls_client_ca=None,
        tls_min_version=None,
    )


def match_bound_port(listener: Listener, addresses: tuple[ListenAddress, ...]) -> None:
    """A listener configured with port 0 matches the address naming the port it got
    ("127.0.0.1:0", then "127.0.0.1:46145" in the file, keeps the socket)."""
    address = listener.address
    if address is None or address.port or address.family == "unix":
        return
    bound = dataclasses.replace(address, port=listener.sock.getsockname()[1])
    # By its socket: the entry naming that port may also change the service or flags.
    if socket_of(bound) in {socket_of(a) for a in addresses}:
        listener.address = bound


def is_at(listener: Listener, wanted: ListenAddress | None) -> bool:
    """Whether the configured address wanted (None: none) is listener's socket."""
    match_bound_port(listener, (wanted,) if wanted is not None else ())
    return listener.address == wanted


def follow(listener: Listener, address: ListenAddress, old_backlog: int, backlog: int) -> None:
    """A listener that stays takes what the file now says of it (PROXY flag, backlog)."""
    listener.address = address
    listener.proxy_protocol = address.proxy_protocol
    if backlog != old_backlog and not listener.is_udp:
        listener.sock.listen(backlog)


def describe_socket(sock: socket.socket) -> str:
    """Name a bound socket as the config would, with the port the kernel chose."""
    if sock.family == socket.AF_UNIX:
        path = sock.getsockname()
        return f"unix:{path if isinstance(path, str) else path.decode(errors='replace')}"
    host, port = sock.getsockname()[:2]
    prefix = "udp:" if sock.type == socket.SOCK_DGRAM else ""
    return (
        f"{prefix}[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{prefix}{host}:{port}"
    )


def bind(address: ListenAddress, backlog: int, reuseport: bool = False) -> Listener:
    """Create a non-blocking, close-on-exec listening socket for address.

    reuseport (TCP and UDP): SO_REUSEPORT, for one socket per worker on the same address.

    Raises:
        BindError: the address is in use, not permitted or does not exist here.
    """
    if address.family == "unix":
        return _bind_unix(address, backlog)
    if address.is_udp:
        return _bind_udp(address, reuseport)
    family = socket.AF_INET6 if address.family == "ipv6" else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        # A restart must not wait for TIME_WAIT connections of the previous run to expire.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            # "[::]:7080" means IPv6 only; "0.0.0.0:7080" is listed separately if wanted.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address.host, address.port))
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise BindError(_bind_message(str(address), e), errno=e.errno) from None
    return Listener(sock, address, describe_socket(sock), proxy_protocol=address.proxy_protocol)


def _bind_udp(address: ListenAddress, reuseport: bool = False) -> Listener:
    """A UDP socket; on a wildcard address it learns each datagram's destination address.

    No SO_REUSEADDR: for UDP it would let a second socket bind the same port and take a
    share of the datagrams, and there is no TIME_WAIT to wait out. SO_REUSEPORT does
    that on purpose, for workers (one socket each), and only when asked.
    """
    family = socket.AF_INET6 if address.family == "ipv6" else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address.host, address.port))
        enable_pktinfo(sock)
    except OSError as e:
        sock.close()
        raise BindError(_bind_message(str(address), e), errno=e.errno) from None
    return Listener(sock, address, describe_socket(sock))


def enable_pktinfo(sock: socket.socket) -> bool:
    """On a wildcard UDP socket, ask for IP_PKTINFO / IPV6_PKTINFO with each datagram.

    A reply from a wildcard socket would otherwise leave from whatever address the route
    picks, not the one the client sent to, and the client drops it (it is not the peer it
    wrote to). Returns whether the socket is a wildcard one (and now gets the option).
    """
    host = sock.getsockname()[0]
    if sock.family == socket.AF_INET6 and host == "::":
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        return True
    if sock.family == socket.AF_INET and host == "0.0.0.0":
        sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        return True
    return False


def _bind_unix(address: ListenAddress, backlog: int) -> Listener:
    path = address.path
    # A socket file left by a previous run would make bind() fail with EADDRINUSE; only a
    # socket is removed, and only when nothing is listening on it any more.
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode) and not _unix_socket_alive(path):
            os.unlink(path)
    sock = socket.socket(
        socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
    )
    try:
        sock.bind(path)
        if address.mode is not None:
            os.chmod(path, address.mode)
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise BindError(_bind_message(str(address), e), errno=e.errno) from None
    return Listener(sock, address, str(address), proxy_protocol=address.proxy_protocol)


def _unix_socket_alive(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


def _bind_message(name: str, e: OSError) -> str:
    if e.errno == errno.EADDRINUSE:
        return f"cannot listen on {name}: address already in use (another process holds it)"
    if e.errno == errno.EACCES:
        return (
            f"cannot listen on {name}: permission denied "
            "(ports below 1024 need CAP_NET_BIND_SERVICE)"
        )
    if e.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {name}: no such address on this host"
    return f"cannot listen on {name}: {e.strerror or e}"


def adopt(sock: socket.socket, configured: dict[str, ListenAddress] | None = None) -> Listener:
    """Wrap a socket inherited from systemd; it is made non-blocking and never closed on reload.

    Args:
        sock: the inherited socket.
        configured: the listen entries of the file that say more than an address (PROXY,
            TLS), by str(address): an inherited socket bound to one of them takes that
            entry as its address, so it reads PROXY headers or speaks TLS as it says.
    """
    sock.setblocking(False)
    name = describe_socket(sock)
    address = (configured or {}).get(name)
    proxy = address is not None and address.proxy_protocol
    return Listener(sock, address, name, inherited=True, proxy_protocol=proxy)


def close(listener: Listener) -> None:
    """Close a listener and remove its Unix socket file (an inherited one belongs to systemd)."""
    listener.sock.close()
    if (
        listener.address is not None
        and listener.address.family == "unix"
        and not listener.inherited
        and not listener.keep_path
    ):
        with contextlib.suppress(OSError):
            os.unlink(listener.address.path)
