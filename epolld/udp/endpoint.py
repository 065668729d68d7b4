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
import struct
import sys
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
    from epolld.udp.mmsg import MmsgBatch

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
# recvmmsg/sendmmsg refused to this process: no symbol, an old kernel, a seccomp filter.
_UNAVAILABLE_ERRNOS: Final = frozenset({errno.ENOSYS, errno.EPERM, errno.EACCES})
_MSG_TRUNC: Final = int(socket.MSG_TRUNC)  # a plain int: IntFlag & int runs enum code in Python
_LIMITER_REASONS: Final = frozenset({RATE, BYTE_RATE, TOTAL_RATE})  # logged by reports

_PKTINFO4_SIZE: Final = 12  # struct in_pktinfo: ifindex, spec_dst, addr
_PKTINFO6_SIZE: Final = 20  # struct in6_pktinfo: addr, ifindex
# IPv4 first octets that are no unicast host: 0/8 "this network", 224/4 multicast, 240/4.
_NOT_UNICAST_V4: Final = frozenset({"0", *(str(n) for n in range(224, 256))})
_NOT_UNICAST4_FIRST: Final = frozenset({0, *range(224, 256)})  # the same, as sin_addr's byte
_NOT_UNICAST6_FIRST: Final = frozenset({0xFF})  # ff00::/8


def _not_unicast(host: str, v6: bool) -> bool:
    """Whether a source address cannot be a single host (a reply would go to many)."""
    if v6:
        return host[:2] in ("ff", "FF") and host[4:5] == ":"  # ff00::/8, multicast
    return host.partition(".")[0] in _NOT_UNICAST_V4


_unavailable_logged = False


def _log_unavailable(error: OSError) -> None:
    """Say once per process that UDP goes one datagram per system call, and why."""
    global _unavailable_logged
    if not _unavailable_logged:
        _unavailable_logged = True
        log.warning("udp_batch_unavailable", error=str(error), fallback="recvfrom/sendto")


def _batch_calls_usable(sock: socket.socket) -> bool:
    """Whether this process may serve sock with recvmmsg/sendmmsg (logs once if not)."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    from epolld.udp import mmsg  # ctypes only where UDP is served

    try:
        mmsg.probe(sock)
    except OSError as e:
        _log_unavailable(e)
        return False
    return True


_LOOPBACK6: Final = socket.inet_pton(socket.AF_INET6, "::1")


def _from_ourselves(source: str, destination: str) -> bool:
    """On a wildcard socket, whether a datagram from our own port came from us.

    From the address it was sent to, or from a loopback address: the socket sending to
    127.0.0.2 from 0.0.0.0 gets 127.0.0.1 as its source, and the reply, sent from
    127.0.0.2 to 127.0.0.1, would come back to this socket, and so on forever.
    """
    return source == destination or source.startswith("127.") or source == "::1"


def _source_text(source: str | int | bytes) -> str:
    """A limiter key as an address: batches key sources by sin_addr (an int) or sin6_addr."""
    if isinstance(source, int):
        return socket.inet_ntop(socket.AF_INET, source.to_bytes(4, sys.byteorder))
    if isinstance(source, bytes):
        return socket.inet_ntop(socket.AF_INET6 if len(source) == 16 else socket.AF_INET, source)
    return source


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

    __slots__ = ("dropped", "echoed", "icmp_errors", "received", "service_bytes")

    def __init__(self) -> None:
        self.received = 0
        self.echoed = 0
        self.icmp_errors = 0  # recv() errors from ICMP messages, skipped
        self.dropped = dict.fromkeys(DROP_REASONS, 0)
        self.service_bytes: dict[str, int] = {}  # services/udp.py: Counters.service_bytes

    def add_to(self, totals: Counters) -> None:
        """Add these counts to totals (a copy the service reports)."""
        totals.udp_received += self.received
        totals.udp_echoed += self.echoed
        totals.udp_icmp_errors += self.icmp_errors
        dropped = totals.udp_dropped
        for reason, n in self.dropped.items():
            dropped[reason] = dropped.get(reason, 0) + n
        for key, n in self.service_bytes.items():
            totals.service_bytes[key] = totals.service_bytes.get(key, 0) + n


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
        self._reply_control = socket.CMSG_SPACE(size)  # the one pktinfo a reply carries
        family = socket.AF_INET6 if self._v6 else socket.AF_INET
        bound = b"" if self._wildcard else socket.inet_pton(family, host.partition("%")[0])
        self._local_packed = bound  # our address as the kernel writes it in a sockaddr
        self._local_word = -1 if self._v6 or not bound else int.from_bytes(bound, sys.byteorder)
        self._pktinfo_level = socket.IPPROTO_IPV6 if self._v6 else socket.IPPROTO_IP
        self._pktinfo_kind = socket.IPV6_PKTINFO if self._v6 else listeners_mod.IP_PKTINFO
        self._ancmin = socket.CMSG_LEN(size)  # a whole pktinfo message
        # Across a batch: the offset of the address's first byte in a sockaddr, and the
        # first bytes of sources that are no unicast host (see _not_unicast).
        self._first_octet = 8 if self._v6 else 4
        self._not_unicast_octets = _NOT_UNICAST6_FIRST if self._v6 else _NOT_UNICAST4_FIRST
        self._refused_for: frozenset[int] | None = None
        self._refused_raw: frozenset[int] = frozenset()
        self._batch: MmsgBatch | None = None
        self._batched = _batch_calls_usable(self.sock)
        self.set_max_datagram(max_datagram)
        self.faults: DatagramFaults | None = None  # faults/datagram.py: drop, delay

    def __repr__(self) -> str:
        return f"<UdpEndpoint fd={self.fd} {self.listener.name} max_datagram={self._size}>"

    @property
    def batched(self) -> bool:
        """Whether this socket is served with recvmmsg/sendmmsg (else recvfrom/sendto)."""
        return self._batch is not None

    def set_max_datagram(self, size: int) -> None:
        """Resize the receive buffers: a datagram longer than size now reads as truncated."""
        self._size = size
        if self._batch is not None:
            self._batch.close()
            self._batch = None
        if self._batched:
            from epolld.udp.mmsg import MmsgBatch

            self._batch = MmsgBatch(self.sock, size, control=self._wildcard)
            self._view = memoryview(b"")
        else:
            self._view = memoryview(bytearray(size))

    def set_faults(self, faults: DatagramFaults | None) -> None:
        """Serve with faults (faults/datagram.py), or without again. A fault endpoint is
        served one datagram at a time (recvfrom/sendto), where intercept() is called; the
        batch path stays free of any fault check."""
        if self.faults is not None:
            self.faults.close()
        self.faults = faults
        self._batched = faults is None and _batch_calls_usable(self.sock)
        self.set_max_datagram(self._size)

    def on_event(self, events: int) -> int:
        """Handle up to DATAGRAMS_PER_EVENT datagrams; reschedule the rest in edge mode."""
        if events & select.EPOLLERR:
            self._clear_errors()
        if self._batch is not None:
            more, limiter_reports = self._serve_batch(self._batch)
        else:
            more, limiter_reports = self._serve_singly()
        if more and self.edge:  # datagrams may be left that no new edge will announce
            self._clock.reschedule((self.fd, select.EPOLLIN))
        if limiter_reports:
            self._log_reports()
        return self.mask

    def _serve_batch(self, batch: MmsgBatch) -> tuple[bool, bool]:
        """One recvmmsg, the checks of each datagram, one sendmmsg of the admitted replies.

        Returns:
            (the batch was full: more may wait, the limiter has drops to report).
        """
        for _ in range(DATAGRAMS_PER_EVENT):  # an ICMP error costs one datagram's budget
            try:
                n = batch.recv()
            except OSError as e:
                if e.errno in _ICMP_ERRNOS:
                    self._stats.icmp_errors += 1
                    continue
                if e.errno in _UNAVAILABLE_ERRNOS:
                    self._fall_back(e)
                    return self._serve_singly()
                log.warning("udp_recv_failed", address=self.listener.name, error=str(e))
                return False, False
            if n == 0:
                return False, False
            return n == batch.slots, self._echo_batch(batch, n)
        return True, False

    def _echo_batch(self, batch: MmsgBatch, n: int) -> bool:
        """Decide each of the n datagrams received, then send the admitted ones' replies.

        The per-datagram rules are _echo()'s, read from the raw headers, addresses and
        control data as small ints (no address string or tuple per datagram).

        Returns:
            Whether the limiter refused one (it has reports to log).
        """
        stats = self._stats
        stats.received += n
        limiter = self._limiter
        if not (limiter.admit_each or self._wildcard) and self._all_plain(batch, n):
            # Every datagram gets its echo: the lengths are copied in one slice, no loop.
            batch.iov_words[2 : n << 2 : 4] = batch.words[14 : n << 4 : 16]
            self._send_batch(batch, n)
            return False
        dropped = stats.dropped
        words, names, name_words = batch.words, batch.names, batch.name_words
        iov_lens, raw = batch.iov_lens, batch.raw
        admit_each, refused = limiter.admit_each, limiter.refused_ports
        now = self._clock.now
        local_port, local_word, local_packed = self._local[1], self._local_word, self._local_packed
        v6, wildcard, stride = self._v6, self._wildcard, batch.name_size
        reports = False
        kept = 0  # replies so far: their headers are moved to slots 0..kept-1
        for i in range(n):
            w = i << 4
            if words[w + 12] & _MSG_TRUNC:  # msg_flags
                dropped[TRUNCATED] += 1
                continue
            o = i * stride
            port = names[o + 2] << 8 | names[o + 3]  # sin_port / sin6_port, network order
            reason = None
            if v6:
                if names[o + 8] == 0xFF:  # sin6_addr in ff00::/8, multicast
                    reason = NOT_UNICAST
                elif wildcard:
                    reason = self._check_destination(batch, i, port)
                elif port == local_port and names[o + 8 : o + 24] == local_packed:
                    reason = SOURCE_PORT  # from ourselves: the reply would loop forever
            else:
                first = names[o + 4]  # the first octet of sin_addr
                if first == 0 or first >= 224:
                    reason = NOT_UNICAST
                elif wildcard:
                    reason = self._check_destination(batch, i, port)
                elif port == local_port and name_words[(o >> 2) + 1] == local_word:
                    reason = SOURCE_PORT
            if reason is None:
                if admit_each:  # the source's key: sin_addr as an int, sin6_addr as bytes
                    key = names[o + 8 : o + 24].tobytes() if v6 else name_words[(o >> 2) + 1]
                    reason = limiter.admit(key, port, words[w + 14], now)
                elif port in refused:
                    reason = SOURCE_PORT
            if reason is not None:
                dropped[reason] += 1
                if reason in _LIMITER_REASONS:
                    reports = True
                continue
            # What to reply: the echo is the datagram itself, slot i's buffer, all msg_len
            # bytes of it (another reply would be written there, its length set here).
            iov_lens[2 * i + 1] = words[w + 14]
            if kept != i:  # move its header next to the replies before it
                raw[kept << 6 : (kept + 1) << 6] = raw[i << 6 : (i + 1) << 6]
            kept += 1
        if kept:
            self._send_batch(batch, kept)
        return reports

    def _all_plain(self, batch: MmsgBatch, n: int) -> bool:
        """Whether each of the n datagrams passes the checks of _echo_batch's loop, looked
        at across the batch in C: no flags (MSG_TRUNC), no source that is not unicast, no
        refused source port or our own (from ourselves?) port. Rate limits are off.
        """
        if any(batch.words[12 : n << 4 : 16]):  # msg_flags
            return False
        refused = self._limiter.refused_ports
        if refused is not self._refused_for:
            local_port = socket.htons(self._local[1])  # as the raw sin_port reads
            self._refused_raw = frozenset({socket.htons(p) for p in refused} | {local_port})
            self._refused_for = refused
        stride = batch.name_size
        if not self._refused_raw.isdisjoint(batch.port_halves[1 : (n * stride) >> 1 : stride >> 1]):
            return False
        first = batch.names[self._first_octet : n * stride : stride]
        return self._not_unicast_octets.isdisjoint(first)

    def _check_destination(self, batch: MmsgBatch, i: int, port: int) -> str | None:
        """On a wildcard socket: slot i's destination from its pktinfo; prepare the reply's.

        The reply carries the same pktinfo (IPv4: ipi_spec_dst as its source, ifindex 0 so
        that the route chooses), so it leaves from the address the datagram was sent to.
        """
        c = i * batch.control_size
        cw = c >> 2
        ctl, ctl_words = batch.controls, batch.control_words
        first_is_pktinfo = (
            batch.words[(i << 4) + 10] >= self._ancmin  # msg_controllen
            and ctl_words[cw + 2] == self._pktinfo_level  # cmsg_level, cmsg_type
            and ctl_words[cw + 3] == self._pktinfo_kind
        )
        if not first_is_pktinfo and not self._find_pktinfo(batch, i):
            batch.quads[(i << 3) + 5] = 0  # no pktinfo (an inherited socket without it)
            return None
        o = i * batch.name_size
        if self._v6:
            if ctl[c + 16] == 0xFF:  # sent to a multicast group
                return NOT_UNICAST
            if port == self._local[1]:  # from ourselves (see _from_ourselves)
                source = batch.names[o + 8 : o + 24]
                if source == ctl[c + 16 : c + 32] or source == _LOOPBACK6:
                    return SOURCE_PORT
        else:
            destination = ctl_words[cw + 6]  # ipi_addr
            if ctl_words[cw + 5] != destination:  # ipi_spec_dst: broadcast or multicast
                return NOT_UNICAST
            if port == self._local[1] and (
                batch.name_words[(o >> 2) + 1] == destination or batch.names[o + 4] == 127
            ):
                return SOURCE_PORT  # from ourselves (see _from_ourselves)
            ctl_words[cw + 4] = 0  # ipi_ifindex
        batch.quads[(i << 3) + 5] = self._reply_control  # msg_controllen: this cmsg only
        return None

    def _find_pktinfo(self, batch: MmsgBatch, i: int) -> bool:
        """Move slot i's pktinfo message to the front of its control data, if it has one.

        Only other socket options put a message before it: rare, so parsed here slowly.
        """
        c = i * batch.control_size
        length = min(batch.words[(i << 4) + 10], batch.control_size)
        offset = 0
        while offset + 16 <= length:
            size, level, kind = struct.unpack_from("QiI", batch.controls, c + offset)
            if size < 16:
                break
            if level == self._pktinfo_level and kind == self._pktinfo_kind and size >= self._ancmin:
                if offset:
                    moved = bytes(batch.controls[c + offset : c + offset + self._ancmin])
                    batch.controls[c : c + self._ancmin] = moved
                return True
            offset += (size + 7) & ~7
        return False

    def _send_batch(self, batch: MmsgBatch, count: int) -> None:
        """sendmmsg the replies in slots 0..count-1; what does not fit is dropped, not queued.

        sendmmsg stops at the first reply that fails and says how many went; the next call
        names that one's error. EAGAIN/ENOBUFS (the send buffer is full) drops all the rest
        at once; another error (EPERM from a firewall) drops that reply only.
        """
        stats = self._stats
        start = 0
        while start < count:
            try:
                sent = batch.send(start, count)
            except OSError as e:
                if e.errno in _SEND_FULL:
                    stats.dropped[SEND_BUFFER] += count - start
                    return
                stats.dropped[SEND_ERROR] += 1
                start += 1
                continue
            stats.echoed += sent
            start += sent

    def _fall_back(self, error: OSError) -> None:
        """Serve this socket with one recvfrom/sendto per datagram from now on."""
        _log_unavailable(error)
        self._batched = False
        self.set_max_datagram(self._size)

    def _serve_singly(self) -> tuple[bool, bool]:
        """Up to DATAGRAMS_PER_EVENT datagrams, one recv and one send system call each.

        Returns:
            (the budget ran out: more may wait, the limiter has drops to report).
        """
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
                return False, limiter_reports
            except OSError as e:
                if e.errno in _ICMP_ERRNOS:
                    stats.icmp_errors += 1
                    continue
                log.warning("udp_recv_failed", address=self.listener.name, error=str(e))
                return False, limiter_reports
            stats.received += 1
            if wildcard:
                reason = self._echo_from_destination(nbytes, ancdata, flags, addr)
            else:
                reason = self._echo(nbytes, addr)
            if reason is not None:
                stats.dropped[reason] += 1
                if reason in _LIMITER_REASONS:
                    limiter_reports = True
        return True, limiter_reports

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
        if flags & _MSG_TRUNC:
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
        if port == local[1] and _from_ourselves(host, local[0]):
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
                    source=_source_text(report.source),
                    reason=report.reason,
                    dropped=report.dropped,
                )
            else:
                log.warning("udp_total_rate_limited", dropped=report.dropped)
        if unreported:
            log.warning("udp_rate_limited_more_sources", sources=unreported)

    def close(self) -> None:
        """Close the socket (the reactor has unregistered it) and free the batch buffers."""
        if self.faults is not None:
            self.faults.close()
        if self._batch is not None:
            self._batch.close()
            self._batch = None
        listeners_mod.close(self.listener)

    def handoff_state(self, out: StateWriter) -> dict[str, Any] | None:
        """At a restart the socket travels (datagrams queue in it meanwhile), with the
        replies its faults hold; the rate limiter's per-source state starts afresh in the
        next process."""
        record = self.listener.handoff_state(out)
        if record is None:
            return None
        held = self.faults.handoff_held(out) if self.faults is not None else None
        return {**record, "kind": "udp", **({"held": held} if held else {})}


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
        # A listener's service -> its endpoint class, other than echo (services/udp.py;
        # the service wires it, so that this module does not import the services).
        self.service_classes: dict[str, type[UdpEndpoint]] = {}
        self.fault_counts: dict[str, int] = {}  # Counters.faults; the service wires it

    def __len__(self) -> int:
        return len(self._endpoints)

    @property
    def listeners(self) -> list[Listener]:
        return [e.listener for e in self._endpoints.values()]

    def endpoints(self) -> list[UdpEndpoint]:
        return list(self._endpoints.values())

    def _class_for(self, listener: Listener) -> type[UdpEndpoint]:
        service = listener.address.service if listener.address is not None else "echo"
        return self.service_classes.get(service, UdpEndpoint)

    def add(self, listener: Listener) -> None:
        """Serve a bound (or inherited) UDP socket with its listener's service."""
        endpoint = self._class_for(listener)(
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
            endpoint.set_faults(None)
            return
        from epolld.faults.datagram import DatagramFaults  # only with a fault listener

        endpoint.set_faults(
            DatagramFaults(faults, self._reactor, endpoint.sock, self.stats, self.fault_counts)
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
        for endpoint in list(self._endpoints.values()):  # a reload may change a service
            cls = self._class_for(endpoint.listener)
            if type(endpoint) is not cls:
                new = cls(
                    endpoint.listener, self._reactor, self.limiter, self.stats,
                    edge=edge, max_datagram=settings.max_datagram_bytes,
                )  # fmt: skip
                self._endpoints[new.fd] = new
                self._reactor.replace(endpoint, new)
                if endpoint._batch is not None:  # the old one's buffers
                    endpoint._batch.close()
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
