"""UDP echo (RFC 862, section 2): one handler per UDP socket, and the counters they share.

Each datagram is echoed once, as one datagram with the same bytes, to its source, from
the address it was sent to; or dropped and counted, never queued:
- Longer than udp.max_datagram (the read buffer): MSG_TRUNC shows it, and a datagram
  is never echoed in part ("truncated").
- Refused by the UdpLimiter: source port, per-source rates, the total rate.
- Sent to a broadcast or multicast address, or "from" one: answering would multiply
  replies ("not_unicast"); from our own address and port: it would loop ("source_port").
- EAGAIN/ENOBUFS on send ("send_buffer"): the reply is dropped, not buffered, and the
  socket is never watched for EPOLLOUT, so a full send buffer cannot make the loop spin.
  Other send errors (EACCES for a broadcast source, EPERM from a firewall) are
  "send_error".
ICMP errors that a UDP socket may report on recv (ECONNREFUSED and friends: RFC 1122
4.1.3.3) are counted and skipped; an EPOLLERR is cleared (SO_ERROR, MSG_ERRQUEUE) so
that a level-triggered socket does not report it forever.

A wildcard socket (0.0.0.0, [::]) gets IP_PKTINFO / IPV6_PKTINFO with each datagram
(listeners.enable_pktinfo) and sends the reply with the destination as its source, or on
a host with several addresses the reply could leave from another one and the client,
expecting its peer's address, would drop it.

Both trigger modes handle at most DATAGRAMS_PER_EVENT datagrams per event; in edge mode
the rest is rescheduled for the next turn (no new edge comes for datagrams already
queued), in level mode epoll reports the socket again. io: splice does not apply: splice(2)
moves bytes between a pipe and a stream, and a datagram's boundaries would be lost.
"""

from __future__ import annotations

import errno
import select
import socket
from typing import TYPE_CHECKING, Any, Final, Protocol

import structlog

from epolld.config import UdpConfig
from epolld.core.loop import Reactor
from epolld.listening import sockets as listeners_mod
from epolld.listening.sockets import Listener
from epolld.udp.ratelimit import BYTE_RATE, RATE, SOURCE_PORT, TOTAL_RATE, UdpLimiter

if TYPE_CHECKING:
    from epolld.core.counters import Counters
    from epolld.faults.datagram import DatagramFaults
    from epolld.handoff import StateWriter

log = structlog.get_logger("epolld")

DATAGRAMS_PER_EVENT: Final = 64  # before yielding to other sockets and connections

# Drop reasons of this module (the limiter's are in ratelimit.py).
TRUNCATED: Final = "truncated"
NOT_UNICAST: Final = "not_unicast"
SEND_BUFFER: Final = "send_buffer"
SEND_ERROR: Final = "send_error"
DROP_REASONS: Final = (
    SOURCE_PORT, RATE, BYTE_RATE, TOTAL_RATE, TRUNCATED, NOT_UNICAST, SEND_BUFFER, SEND_ERROR,
)  # fmt: skip

# recv() errors on a UDP socket that are an ICMP message about an earlier datagram.
_ICMP_ERRNOS: Final = frozenset({
    errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN,
    errno.ENETDOWN, errno.ECONNRESET, errno.EPROTO, errno.ENOPROTOOPT, errno.EMSGSIZE,
})  # fmt: skip
_SEND_FULL: Final = frozenset({errno.EAGAIN, errno.ENOBUFS})
_LIMITER_REASONS: Final = frozenset({RATE, BYTE_RATE, TOTAL_RATE})  # logged by reports

_PKTINFO4_SIZE: Final = 12  # struct in_pktinfo: ifindex, spec_dst, addr
_PKTINFO6_SIZE: Final = 20  # struct in6_pktinfo: addr, ifindex
# IPv4 first octets that are no unicast host: 0/8 "this network", 224/4 multicast, 240/4.
_NOT_UNICAST_V4: Final = frozenset({"0", *(str(n) for n in range(224, 256))})


def _not_unicast(host: str, v6: bool) -> bool:
    """Whether a source address cannot be a single host (a reply would go to many)."""
    if v6:
        return host[:2] in ("ff", "FF") and host[4:5] == ":"  # ff00::/8, multicast
    return host.partition(".")[0] in _NOT_UNICAST_V4


class Clock(Protocol):
    """What a UDP handler needs of the reactor: the turn's time and a deferred event."""

    @property
    def now(self) -> float: ...

    def reschedule(self, item: tuple[int, int]) -> None: ...


class UdpStats:
    """Datagram counters of this process; every UDP socket adds to the same ones.

    Plain attributes on the hot path (one datagram, one increment), read into the
    service's totals (counters.Counters) when it reports: add_to().
    """

    __slots__ = ("dropped", "echoed", "icmp_errors", "received")

    def __init__(self) -> None:
        self.received = 0
        self.echoed = 0
        self.icmp_errors = 0  # recv() errors from ICMP messages, skipped
        self.dropped = dict.fromkeys(DROP_REASONS, 0)

    def add_to(self, totals: Counters) -> None:
        """Add these counts to totals (a copy the service reports)."""
        totals.udp_received += self.received
        totals.udp_echoed += self.echoed
        totals.udp_icmp_errors += self.icmp_errors
        dropped = totals.udp_dropped
        for reason, n in self.dropped.items():
            dropped[reason] = dropped.get(reason, 0) + n


class UdpEndpoint:
    """The handler of one UDP socket: receives datagrams and echoes the admitted ones.

    Args:
        listener: the bound (or inherited) UDP socket; closed by close().
        clock: the reactor (now, reschedule).
        limiter: the daemon's UdpLimiter, shared by every UDP socket.
        stats: the daemon's UdpStats.
        edge: edge-triggered registration.
        max_datagram: the longest datagram echoed, in bytes.
    """

    def __init__(
        self,
        listener: Listener,
        clock: Clock,
        limiter: UdpLimiter,
        stats: UdpStats,
        *,
        edge: bool,
        max_datagram: int,
    ) -> None:
        self.listener = listener
        self.sock = listener.sock
        self.fd = listener.fd
        self.edge = edge
        self.mask = select.EPOLLIN | select.EPOLLET if edge else select.EPOLLIN
        self.active_at = 0.0
        self._clock = clock
        self._limiter = limiter
        self._stats = stats
        self._v6 = self.sock.family == socket.AF_INET6
        local = self.sock.getsockname()
        self._local = (local[0], local[1])
        host = local[0]
        self._wildcard = host in ("0.0.0.0", "::")
        if self._wildcard:
            listeners_mod.enable_pktinfo(self.sock)  # an inherited socket may lack it
        size = _PKTINFO6_SIZE if self._v6 else _PKTINFO4_SIZE
        self._ancsize = socket.CMSG_SPACE(size) if self._wildcard else 0
        self.set_max_datagram(max_datagram)
        self.faults: DatagramFaults | None = None  # faults/datagram.py: drop, delay

    def __repr__(self) -> str:
        return f"<UdpEndpoint fd={self.fd} {self.listener.name} max_datagram={self._size}>"

    def set_max_datagram(self, size: int) -> None:
        """Resize the receive buffer: a datagram longer than size now reads as truncated."""
        self._size = size
        self._view = memoryview(bytearray(size))

    def on_event(self, events: int) -> int:
        """Handle up to DATAGRAMS_PER_EVENT datagrams; reschedule the rest in edge mode."""
        if events & select.EPOLLERR:
            self._clear_errors()
        sock, stats, wildcard = self.sock, self._stats, self._wildcard
        limiter_reports = False
        for _ in range(DATAGRAMS_PER_EVENT):
            try:
                if wildcard:
                    nbytes, ancdata, flags, addr = sock.recvmsg_into([self._view], self._ancsize)
                else:
                    # MSG_TRUNC: the datagram's real length, so that a longer one shows.
                    nbytes, addr = sock.recvfrom_into(self._view, 0, socket.MSG_TRUNC)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno in _ICMP_ERRNOS:
                    stats.icmp_errors += 1
                    continue
                log.warning("udp_recv_failed", address=self.listener.name, error=str(e))
                break
            stats.received += 1
            if wildcard:
                reason = self._echo_from_destination(nbytes, ancdata, flags, addr)
            else:
                reason = self._echo(nbytes, addr)
            if reason is not None:
                stats.dropped[reason] += 1
                if reason in _LIMITER_REASONS:
                    limiter_reports = True
        else:
            if self.edge:  # datagrams may be left that no new edge will announce
                self._clock.reschedule((self.fd, select.EPOLLIN))
        if limiter_reports:
            self._log_reports()
        return self.mask

    def _echo(self, nbytes: int, addr: Any) -> str | None:
        """Echo a datagram on a socket bound to one address; None when sent, else why not.

        recvfrom/sendto rather than recvmsg/sendmsg: no ancillary data is needed here, and
        they are the cheaper calls on the hot path.
        """
        if nbytes > self._size:
            return TRUNCATED
        host, port = addr[0], addr[1]
        if _not_unicast(host, self._v6):
            return NOT_UNICAST
        if port == self._local[1] and host == self._local[0]:
            return SOURCE_PORT  # from ourselves: the reply would come back to us, forever
        reason = self._limiter.admit(host, port, nbytes, self._clock.now)
        if reason is not None:
            return reason
        if self.faults is not None and self.faults.intercept(
            self._view[:nbytes], addr, [], self._clock.now
        ):
            return None  # dropped or held by a fault: counted there
        try:
            self.sock.sendto(self._view[:nbytes], addr)
        except OSError as e:
            return SEND_BUFFER if e.errno in _SEND_FULL else SEND_ERROR
        self._stats.echoed += 1
        return None

    def _echo_from_destination(self, nbytes: int, ancdata: list[tuple[int, int, bytes]],
                               flags: int, addr: Any) -> str | None:  # fmt: skip
        """Echo a datagram on a wildcard socket, from the address it was sent to."""
        if flags & socket.MSG_TRUNC:
            return TRUNCATED
        host, port = addr[0], addr[1]
        if _not_unicast(host, self._v6):
            return NOT_UNICAST
        reply_anc: list[tuple[int, int, bytes]] = []
        local = self._local
        for level, kind, data in ancdata:
            if self._v6 and kind == socket.IPV6_PKTINFO and len(data) >= _PKTINFO6_SIZE:
                if data[0] == 0xFF:  # sent to a multicast group
                    return NOT_UNICAST
                # Our destination address and the arriving interface (link-local needs it).
                reply_anc = [(level, kind, data[:_PKTINFO6_SIZE])]
                local = (socket.inet_ntop(socket.AF_INET6, data[:16]), local[1])
            elif not self._v6 and kind == listeners_mod.IP_PKTINFO and len(data) >= 12:
                spec_dst, destination = data[4:8], data[8:12]
                if spec_dst != destination:  # broadcast or multicast: not a local unicast
                    return NOT_UNICAST
                # ipi_spec_dst is the reply's source; ifindex 0 lets the route choose.
                reply_anc = [(level, kind, b"\0\0\0\0" + spec_dst + b"\0\0\0\0")]
                local = (socket.inet_ntop(socket.AF_INET, destination), local[1])
        if port == local[1] and host == local[0]:
            return SOURCE_PORT  # from ourselves: the reply would come back to us, forever
        reason = self._limiter.admit(host, port, nbytes, self._clock.now)
        if reason is not None:
            return reason
        if self.faults is not None and self.faults.intercept(
            self._view[:nbytes], addr, reply_anc, self._clock.now
        ):
            return None  # dropped or held by a fault: counted there
        try:
            self.sock.sendmsg([self._view[:nbytes]], reply_anc, 0, addr)
        except OSError as e:
            return SEND_BUFFER if e.errno in _SEND_FULL else SEND_ERROR
        self._stats.echoed += 1
        return None

    def _clear_errors(self) -> None:
        """Read away a pending error and the error queue (ICMP messages under IP_RECVERR).

        We never set IP_RECVERR, but a socket passed by systemd or a future option might
        have it: its error queue keeps EPOLLERR up, and a level-triggered loop would spin.
        """
        if self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            self._stats.icmp_errors += 1
        for _ in range(DATAGRAMS_PER_EVENT):
            try:
                self.sock.recvmsg(1, 1024, socket.MSG_ERRQUEUE)
            except OSError:  # EAGAIN: the queue is empty
                break
            self._stats.icmp_errors += 1

    def _log_reports(self) -> None:
        reports, unreported = self._limiter.take_reports()
        for report in reports:
            if report.source:
                log.warning(
                    "udp_rate_limited",
                    source=report.source,
                    reason=report.reason,
                    dropped=report.dropped,
                )
            else:
                log.warning("udp_total_rate_limited", dropped=report.dropped)
        if unreported:
            log.warning("udp_rate_limited_more_sources", sources=unreported)

    def close(self) -> None:
        """Close the socket (the reactor has unregistered it)."""
        if self.faults is not None:
            self.faults.close()
        listeners_mod.close(self.listener)

    def handoff_state(self, out: StateWriter) -> dict[str, Any] | None:
        """At a restart the socket travels (datagrams queue in it meanwhile); the rate
        limiter's per-source state starts afresh in the next process."""
        record = self.listener.handoff_state(out)
        return None if record is None else {**record, "kind": "udp"}


class UdpEndpoints:
    """The daemon's UDP sockets with the limiter and counters they share (EchoService's part).

    Args:
        reactor: where the endpoints are registered.
        settings: the udp: section.
        edge: edge-triggered registration.
    """

    def __init__(self, reactor: Reactor, settings: UdpConfig, *, edge: bool) -> None:
        self._reactor = reactor
        self._settings = settings
        self._edge = edge
        self.limiter = UdpLimiter(settings, reactor.now)
        self.stats = UdpStats()
        self._endpoints: dict[int, UdpEndpoint] = {}
        self.fault_counts: dict[str, int] = {}  # Counters.faults; the service wires it

    def __len__(self) -> int:
        return len(self._endpoints)

    @property
    def listeners(self) -> list[Listener]:
        return [e.listener for e in self._endpoints.values()]

    def endpoints(self) -> list[UdpEndpoint]:
        return list(self._endpoints.values())

    def add(self, listener: Listener) -> None:
        """Serve a bound (or inherited) UDP socket."""
        endpoint = UdpEndpoint(
            listener,
            self._reactor,
            self.limiter,
            self.stats,
            edge=self._edge,
            max_datagram=self._settings.max_datagram_bytes,
        )
        self._endpoints[endpoint.fd] = endpoint
        self._set_faults(endpoint)
        self._reactor.add(endpoint)

    def _set_faults(self, endpoint: UdpEndpoint) -> None:
        """The faults its listen entry names now (a reload's take effect at once)."""
        address = endpoint.listener.address
        faults = address.faults if address is not None else None
        current = endpoint.faults
        if (current.faults if current is not None else None) == faults:
            return
        if faults is None:
            endpoint.faults = None
            return
        from epolld.faults.datagram import DatagramFaults  # only with a fault listener

        endpoint.faults = DatagramFaults(
            faults, self._reactor, endpoint.sock, self.stats, self.fault_counts
        )

    def remove(self, listener: Listener) -> None:
        """Stop serving a UDP socket and close it."""
        endpoint = self._endpoints.pop(listener.fd, None)
        if endpoint is not None:
            self._reactor.close(endpoint)

    def configure(self, settings: UdpConfig, *, edge: bool) -> None:
        """Apply reloaded limits and trigger mode at once; the sockets stay."""
        self.limiter.configure(settings, self._reactor.now)
        if settings.max_datagram_bytes != self._settings.max_datagram_bytes:
            for endpoint in self._endpoints.values():
                endpoint.set_max_datagram(settings.max_datagram_bytes)
        if edge != self._edge:
            mask = select.EPOLLIN | select.EPOLLET if edge else select.EPOLLIN
            for endpoint in self._endpoints.values():
                endpoint.edge = edge
                self._reactor.set_mask(endpoint, mask)
        self._settings = settings
        self._edge = edge
        for endpoint in self._endpoints.values():
            self._set_faults(endpoint)

    def close_all(self) -> None:
        """Close every UDP socket at once (a graceful stop has nothing to drain for UDP)."""
        for endpoint in list(self._endpoints.values()):
            self._reactor.close(endpoint)
        self._endpoints.clear()

    def gauges(self) -> dict[str, int]:
        """udp_listeners and udp_sources, for the stats line (the totals are in UdpStats)."""
        return {"udp_listeners": len(self._endpoints), "udp_sources": len(self.limiter)}
