"""The PROXY protocol (HAProxy's proxy-protocol.txt, versions 1 and 2): parser and reader.

A HeaderParser is fed bytes as they arrive and answers None (need more), a Parsed (the
header, and the bytes that followed it in the same chunk), or raises ProxyHeaderError
with a reason. It holds no socket, so every case is tested on bytes alone. HeaderReader
is the reactor handler that drives it on one accepted socket; HeaderErrors counts and
logs (rate-limited) the connections refused.

Why it looks the way it does:
- The two versions are told apart by the first byte ("P" or "\\r"), and every byte of
  "PROXY " or of the 12-byte v2 signature is checked as it arrives: a client that is
  not a proxy is refused at its first wrong byte, not after a timeout.
- What is kept is bounded by MAX_KEPT_BYTES (232: a v2 header's fixed part and its
  largest address block). A v1 line is at most 107 bytes (the spec's worst case) and
  v2 TLVs are validated as they stream past and never stored, so a header of up to
  16 + 65535 bytes is read in at most 232 bytes of memory. Twisted's v2 parser keeps
  all it is fed until the header is complete; Postfix reads into one fixed buffer:
  we follow Postfix.
- `wanted` says how many more bytes the header may still take; bytes fed beyond the
  header's end come back as `rest`, so a reader that peeks can leave the payload in
  the kernel and take only the header's bytes.
- Valid v2 combinations that an echo server has no use for (UDP, AF_UNIX, UNSPEC)
  fall back to "no address" as the spec allows, and so do LOCAL and v1 UNKNOWN: the
  caller serves those as connections from the proxy itself.
- An IPv4-mapped IPv6 source (::ffff:192.0.2.1) is reported as the IPv4 address, as
  Postfix does, so one client has one address for per-IP limits.
"""

from __future__ import annotations

import errno
import ipaddress
import re
import select
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol

from epolld.core.loop import CLOSE

if TYPE_CHECKING:
    from epolld.handoff import State, StateWriter

V1_MAX_BYTES = 107  # "PROXY UNKNOWN <two IPv6> 65535 65535\r\n", the spec's worst case
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED_BYTES = 16  # signature, version/command, family/protocol, length
_V1_PREFIX = b"PROXY "
_ADDRESS_BYTES = {0x1: 12, 0x2: 36, 0x3: 216}  # v2 family -> address block size
MAX_KEPT_BYTES = V2_FIXED_BYTES + max(_ADDRESS_BYTES.values())  # 232 >= V1_MAX_BYTES
_TLV_HEAD_BYTES = 3  # type, length (2 bytes, network order)

# The reasons a header is refused: a fixed set, so that they can label a metric.
Reason = Literal[
    "not_proxy_protocol",  # the first bytes are neither "PROXY " nor the v2 signature
    "v1_too_long",  # no CRLF within 107 bytes
    "v1_malformed",  # a lone CR or LF, a wrong token, address or port
    "v2_bad_version",  # the version nibble is not 2
    "v2_bad_command",  # neither LOCAL nor PROXY
    "v2_bad_family",  # an address family or transport the spec does not define
    "v2_short_address",  # the length is smaller than the family's address block
    "v2_bad_tlv",  # a TLV runs past the end of the header
]
REASONS: tuple[Reason, ...] = Reason.__args__  # type: ignore[attr-defined]

Family = Literal["tcp4", "tcp6", "udp4", "udp6", "unix_stream", "unix_dgram", "unspec", "unknown"]
Address = tuple[str, int]


class ProxyHeaderError(Exception):
    """A header that is not valid; reason is one of REASONS, str() says what was wrong."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason: Reason = reason


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A complete, valid header.

    source and destination are (IP text, port) for TCP over IPv4 or IPv6 under the PROXY
    command, and None otherwise: LOCAL, v1 UNKNOWN, or a family an echo server cannot use.
    """

    version: Literal[1, 2]
    command: Literal["proxy", "local"]
    family: Family
    source: Address | None
    destination: Address | None
    length: int  # bytes of the header on the wire

    @property
    def is_local(self) -> bool:
        """True when the connection is to be served as coming from the proxy itself."""
        return self.source is None


class Parsed(NamedTuple):
    """What feed() returns once the header is complete."""

    header: ProxyHeader
    rest: bytes  # the bytes of the same chunk after the header: payload, to be echoed


_V2_FAMILIES: dict[int, Family] = {
    0x11: "tcp4",
    0x12: "udp4",
    0x21: "tcp6",
    0x22: "udp6",
    0x31: "unix_stream",
    0x32: "unix_dgram",
}
_V1_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")
_V1_IPV4 = re.compile(rb"(?:0|[1-9][0-9]{0,2})(?:\.(?:0|[1-9][0-9]{0,2})){3}")
_V1_IPV6 = re.compile(rb"[0-9A-Fa-f:.]{2,45}")  # the text inet_pton then checks; no %scope
_V4_MAPPED = bytes(10) + b"\xff\xff"  # ::ffff:0:0/96


def _ip_text(packed: bytes) -> str:
    """Canonical text of a packed IPv4 or IPv6 address; a v4-mapped IPv6 one as IPv4.

    IPv6 goes through ipaddress, for RFC 5952 text however the header wrote it (glibc's
    inet_ntop writes ::1:0 as "::0.1.0.0"); IPv4 through inet_ntop, which is faster.
    """
    if len(packed) == 4:
        return socket.inet_ntop(socket.AF_INET, packed)
    if packed[:12] == _V4_MAPPED:
        return socket.inet_ntop(socket.AF_INET, packed[12:])
    return str(ipaddress.IPv6Address(packed))


class HeaderParser:
    """Reads one PROXY header, fed in chunks of any size (one byte at a time too).

    Not reusable: after a Parsed or a ProxyHeaderError, make a new one.
    """

    __slots__ = ("_done", "_kept", "_length", "_seen", "_tlv_head", "_tlv_left", "_version")

    def __init__(self) -> None:
        self._kept = bytearray()  # v1: the line so far; v2: fixed part and address block
        self._version = 0  # 0 until the first byte tells
        self._seen = 0  # bytes of the header consumed so far
        self._length = 0  # v2: the whole header's size, once the fixed part is in
        self._tlv_left = 0  # v2: TLV bytes still to skip in the current value
        self._tlv_head = bytearray()  # v2: the partial type/length of the next TLV
        self._done = False

    @property
    def buffered_bytes(self) -> int:
        """Bytes held for this header now; never more than MAX_KEPT_BYTES."""
        return len(self._kept) + len(self._tlv_head)

    @property
    def wanted(self) -> int:
        """The most bytes the header can still take: a read of this many never takes payload.

        For v1 the end is not known before the CRLF, so it is what the line may still hold.
        """
        if self._version == 1:
            return V1_MAX_BYTES - self._seen
        if self._version == 2 and self._length:
            return self._length - self._seen
        if self._version == 2:
            return V2_FIXED_BYTES - self._seen
        return len(_V1_PREFIX)  # the shortest prefix that tells either version apart

    def feed(self, data: bytes) -> Parsed | None:
        """Take the next chunk of the connection's bytes.

        Args:
            data: bytes as received; may be empty.

        Returns:
            None while the header is incomplete (every byte of data was taken), or a
            Parsed with the header and the bytes of data that follow it.

        Raises:
            ProxyHeaderError: the bytes so far cannot start or be a valid header.
            RuntimeError: feed() after the header was complete (a bug in the caller).
        """
        if self._done:
            raise RuntimeError("HeaderParser.feed() after the header was complete")
        if not data:
            return None
        if not self._version:
            self._version = 1 if data[0] == _V1_PREFIX[0] else 2
            if self._version == 2 and data[0] != V2_SIGNATURE[0]:
                raise ProxyHeaderError(
                    "not_proxy_protocol", f"expected a PROXY header, got {bytes(data[:8])!r}"
                )
        parsed = self._feed_v1(data) if self._version == 1 else self._feed_v2(data)
        self._done = parsed is not None
        return parsed

    # --- version 1: one line of text ------------------------------------------------

    def _feed_v1(self, data: bytes) -> Parsed | None:
        start = self._seen
        end = data.find(b"\n")
        take = data if end < 0 else data[: end + 1]
        if start + len(take) > V1_MAX_BYTES:
            take = take[: V1_MAX_BYTES - start]
            end = -1
        self._kept += take
        self._seen += len(take)
        line = self._kept
        checked = min(len(line), len(_V1_PREFIX))
        if line[:checked] != _V1_PREFIX[:checked]:
            raise ProxyHeaderError(
                "not_proxy_protocol", f"expected a PROXY header, got {bytes(line[:8])!r}"
            )
        # A CR anywhere but right before the LF is a lone CR: refused as the spec asks.
        cr = line.find(b"\r", max(0, start - 1))  # a CR that ended the last chunk too
        # Allowed: the CR right before the LF, or (no LF yet) one that ends this chunk.
        if cr >= 0 and cr != (len(line) - 2 if end >= 0 else len(line) - 1):
            raise ProxyHeaderError("v1_malformed", "a CR that does not end the line")
        if end < 0:
            if self._seen >= V1_MAX_BYTES:
                raise ProxyHeaderError(
                    "v1_too_long", f"no CRLF within {V1_MAX_BYTES} bytes of a v1 header"
                )
            return None
        if not line.endswith(b"\r\n"):
            raise ProxyHeaderError("v1_malformed", "the line ends with LF, not CRLF")
        header = self._parse_v1(bytes(line[len(_V1_PREFIX) : -2]), len(line))
        return Parsed(header, bytes(data[end + 1 :]))

    @staticmethod
    def _parse_v1(text: bytes, length: int) -> ProxyHeader:
        if text == b"UNKNOWN" or text.startswith(b"UNKNOWN "):
            # "the receiver must ignore anything presented before the CRLF"
            return ProxyHeader(1, "proxy", "unknown", None, None, length)
        fields = text.split(b" ")
        if len(fields) != 5 or fields[0] not in (b"TCP4", b"TCP6"):
            raise ProxyHeaderError(
                "v1_malformed", f"expected TCP4, TCP6 or UNKNOWN with 4 fields, got {text[:40]!r}"
            )
        protocol, src, dst, src_port, dst_port = fields
        addresses: list[str] = []
        six = protocol == b"TCP6"
        for field in (src, dst):
            try:
                if (_V1_IPV6 if six else _V1_IPV4).fullmatch(field):
                    af = socket.AF_INET6 if six else socket.AF_INET
                    addresses.append(_ip_text(socket.inet_pton(af, field.decode())))
                    continue
            except OSError:  # inet_pton: not an address of that family
                pass
            raise ProxyHeaderError(
                "v1_malformed", f"not an {protocol.decode()} address: {field[:40]!r}"
            )
        ports: list[int] = []
        for field in (src_port, dst_port):
            if not _V1_PORT.fullmatch(field) or int(field) > 0xFFFF:
                raise ProxyHeaderError("v1_malformed", f"not a port: {field[:10]!r}")
            ports.append(int(field))
        family: Family = "tcp4" if protocol == b"TCP4" else "tcp6"
        return ProxyHeader(
            1, "proxy", family, (addresses[0], ports[0]), (addresses[1], ports[1]), length
        )

    # --- version 2: binary -------------------------------------------------------------

    def _feed_v2(self, data: bytes) -> Parsed | None:
        view = memoryview(data)
        used = 0
        if self._seen < V2_FIXED_BYTES:
            used = self._take_fixed(view)
            if self._seen < V2_FIXED_BYTES:
                return None
        kept_end = V2_FIXED_BYTES + self._address_bytes()
        if self._seen < kept_end:  # the address block: kept, it is parsed whole
            take = min(kept_end - self._seen, len(view) - used)
            self._kept += view[used : used + take]
            self._seen += take
            used += take
            if self._seen < kept_end:
                return None
        used += self._skip_tlvs(view[used:])
        if self._seen < self._length:
            return None
        return Parsed(self._parse_v2(), bytes(view[used:]))

    def _take_fixed(self, view: memoryview) -> int:
        """Keep the bytes of the 16-byte fixed part, checking each as it arrives."""
        take = min(V2_FIXED_BYTES - self._seen, len(view))
        self._kept += view[:take]
        self._seen += take
        got = self._kept
        checked = min(len(got), len(V2_SIGNATURE))
        if got[:checked] != V2_SIGNATURE[:checked]:
            raise ProxyHeaderError(
                "not_proxy_protocol", f"expected a PROXY header, got {bytes(got[:8])!r}"
            )
        if len(got) > 12 and got[12] >> 4 != 2:
            raise ProxyHeaderError("v2_bad_version", f"v2 header of version {got[12] >> 4}")
        if len(got) > 12 and got[12] & 0xF not in (0, 1):
            raise ProxyHeaderError("v2_bad_command", f"unknown v2 command {got[12] & 0xF}")
        if len(got) > 13 and not self._is_local() and (got[13] >> 4 > 3 or got[13] & 0xF > 2):
            raise ProxyHeaderError("v2_bad_family", f"unknown v2 family/transport 0x{got[13]:02x}")
        if len(got) == V2_FIXED_BYTES:
            self._length = V2_FIXED_BYTES + int.from_bytes(got[14:16], "big")
            if self._length - V2_FIXED_BYTES < self._address_bytes():
                raise ProxyHeaderError(
                    "v2_short_address",
                    f"v2 length {self._length - V2_FIXED_BYTES} is shorter than the"
                    f" {self._address_bytes()}-byte address block of family 0x{got[13]:02x}",
                )
        return take

    def _is_local(self) -> bool:
        return self._kept[12] & 0xF == 0

    def _address_bytes(self) -> int:
        """The address block that is kept and parsed: none for LOCAL or UNSPEC."""
        if self._is_local() or self._kept[13] & 0xF == 0:
            return 0
        return _ADDRESS_BYTES.get(self._kept[13] >> 4, 0)

    def _skip_tlvs(self, view: memoryview) -> int:
        """Walk the TLVs without keeping them; returns the bytes of view taken.

        Under LOCAL or an UNSPEC family the spec says to ignore what follows the fixed
        part, so it is skipped without being read as TLVs.
        """
        take = min(self._length - self._seen, len(view))
        if self._is_local() or not self._address_bytes():
            self._seen += take
            return take
        position = 0
        while position < take:
            if self._tlv_left:
                step = min(self._tlv_left, take - position)
                self._tlv_left -= step
                position += step
                continue
            need = _TLV_HEAD_BYTES - len(self._tlv_head)
            piece = view[position : position + min(need, take - position)]
            self._tlv_head += piece
            position += len(piece)
            if len(self._tlv_head) == _TLV_HEAD_BYTES:
                kind = self._tlv_head[0]
                self._tlv_left = int.from_bytes(self._tlv_head[1:3], "big")
                self._tlv_head.clear()
                beyond = self._seen + position + self._tlv_left - self._length
                if beyond > 0:
                    raise ProxyHeaderError(
                        "v2_bad_tlv",
                        f"TLV of type 0x{kind:02x} runs {beyond} bytes past the header",
                    )
        self._seen += take
        if self._seen == self._length and (self._tlv_head or self._tlv_left):
            raise ProxyHeaderError("v2_bad_tlv", "the header ends inside a TLV's type and length")
        return take

    def _parse_v2(self) -> ProxyHeader:
        kept = bytes(self._kept)
        if self._is_local():
            return ProxyHeader(2, "local", "unspec", None, None, self._length)
        family = _V2_FAMILIES.get(kept[13], "unspec")
        if family not in ("tcp4", "tcp6"):
            return ProxyHeader(2, "proxy", family, None, None, self._length)
        size = 4 if family == "tcp4" else 16
        block = kept[V2_FIXED_BYTES:]
        source = _ip_text(block[:size])
        destination = _ip_text(block[size : 2 * size])
        ports = block[2 * size : 2 * size + 4]
        return ProxyHeader(
            2,
            "proxy",
            family,
            (source, int.from_bytes(ports[:2], "big")),
            (destination, int.from_bytes(ports[2:], "big")),
            self._length,
        )


def parse(data: bytes) -> Parsed | None:
    """Parse a header from bytes at hand (tests, tools); see HeaderParser.feed()."""
    return HeaderParser().feed(data)


# --- the connection side: a handler that reads the header off a socket -----------------

# Reasons a connection of a proxy_protocol listener is closed before its header is in,
# besides the parser's: they label the same counter.
ConnectionReason = Literal["untrusted_source", "timeout", "closed_before_header"]
CONNECTION_REASONS: tuple[ConnectionReason, ...] = ConnectionReason.__args__  # type: ignore[attr-defined]
ALL_REASONS: tuple[str, ...] = REASONS + CONNECTION_REASONS
# Bytes peeked per read: every v1 header and a v2 header with the usual TLVs in one read
# (the spec keeps headers within 536 bytes, "the smallest TCP segment"). Peeking past
# the header costs a copy, never a payload byte: only the header's bytes are taken.
PEEK_BYTES = 536
# A header needs one read (two with a large TLV), plus one that finds EAGAIN, unless its
# bytes trickle in while they are read; then the rest waits for a synthetic event.
READS_PER_EVENT = 8
LOG_EVERY_S = 10.0  # per reason, at most one warning this often; the rest are counted


def is_trusted(ip: str, trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> bool:
    """Whether a peer may send a header: a unix socket peer ("") always may."""
    if not ip:
        return True
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(address in network for network in trusted)


class ReaderOwner(Protocol):
    """What a HeaderReader reports to (the service)."""

    def header_read(self, reader: HeaderReader, header: ProxyHeader) -> int:
        """The header is complete: replace the reader; return its on_event's result."""
        ...

    def header_failed(self, reader: HeaderReader, reason: str, detail: str) -> None:
        """The header cannot be had; the reader returns CLOSE next."""
        ...

    def reader_closed(self, reader: HeaderReader) -> None:
        """The reader's socket was closed (a failure, the timeout, a shutdown)."""
        ...


class HeaderReader:
    """The handler of one connection on a proxy_protocol listener until its header is in.

    Nothing is echoed meanwhile. Each read peeks at what has arrived, feeds it to the
    parser, and then takes off the socket only the header's bytes: the payload stays in
    the kernel for the Connection that replaces this reader (copy or splice alike).

    Args:
        sock: the accepted, non-blocking socket.
        ip: the proxy's IP ("" for a unix socket), as accept() gave it.
        peer: the proxy's printable address.
        listener: the name of the listener it came from, for the connection's logs.
        mask: the epoll mask to register with: the Connection's, so that replacing the
            reader needs no epoll_ctl.
        now: the reactor's clock at accept time.
        owner: told when the header is read, has failed, and when the socket closed.
        reschedule: the reactor's, for a synthetic event when the read budget ran out.
    """

    __slots__ = ("active_at", "fd", "ip", "listener", "mask", "opened_at", "owner", "parser",
                 "peer", "reschedule", "sock")  # fmt: skip

    def __init__(
        self,
        sock: socket.socket,
        ip: str,
        peer: str,
        *,
        listener: str = "",
        mask: int,
        now: float,
        owner: ReaderOwner,
        reschedule: Callable[[tuple[int, int]], None],
    ) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.ip = ip
        self.peer = peer
        self.listener = listener
        self.mask = mask
        self.opened_at = now
        self.active_at = now
        self.parser = HeaderParser()
        self.owner = owner
        self.reschedule = reschedule

    def on_event(self, events: int) -> int:
        """Read what the header still needs; the next mask, or CLOSE on a failure.

        Reads until EAGAIN in both trigger modes: in edge mode an EOF that came with the
        last bytes brings no new edge, so it must be seen now.
        """
        for _ in range(READS_PER_EVENT):
            try:
                data = self.sock.recv(max(PEEK_BYTES, self.parser.wanted), socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                return self.mask
            except OSError as e:
                return self._fail("closed_before_header", errno.errorcode.get(e.errno or 0, str(e)))
            if not data:
                return self._fail("closed_before_header", "EOF")
            try:
                parsed = self.parser.feed(data)
            except ProxyHeaderError as e:
                return self._fail(e.reason, str(e))
            used = len(data) - (len(parsed.rest) if parsed is not None else 0)
            # Peeked bytes are queued: a recv() of them returns them all at once.
            taken = len(self.sock.recv(used))
            if taken != used:  # only if someone else read the socket: a bug, not a peer
                raise RuntimeError(f"PROXY header: took {taken} of {used} peeked bytes")
            if parsed is not None:
                return self.owner.header_read(self, parsed.header)
        self.reschedule((self.fd, select.EPOLLIN))  # bytes may wait that no edge announces
        return self.mask

    def _fail(self, reason: str, detail: str) -> int:
        self.owner.header_failed(self, reason, detail)
        return CLOSE

    def close(self) -> None:
        """Release the socket (the reactor has unregistered it), then tell the owner."""
        self.sock.close()
        self.owner.reader_closed(self)

    def handoff_state(self, out: StateWriter) -> dict[str, Any]:
        """At a restart: the socket, the proxy's address, the listener, the accept time
        (the timeout runs on) and the parser's state; bytes not yet taken stay queued in
        the socket."""
        parser = {name: getattr(self.parser, name) for name in HeaderParser.__slots__}
        for name in ("_kept", "_tlv_head"):
            parser[name] = out.data(parser[name])
        return {
            "kind": "proxy_header",
            "fd": out.fd(self.fd),
            "ip": self.ip,
            "peer": self.peer,
            "listener": self.listener,
            "opened_at": self.opened_at,
            "active_at": self.active_at,
            "parser": parser,
        }

    def restore_parser(self, saved: dict[str, Any], state: State) -> None:
        """Continue the header where the previous process left it.

        Raises:
            KeyError, TypeError: a record from a parser with other fields.
        """
        for name in HeaderParser.__slots__:
            value = saved[name]
            if name in ("_kept", "_tlv_head"):
                value = bytearray(state.data(value))
            setattr(self.parser, name, value)

    def __repr__(self) -> str:
        return (
            f"<HeaderReader fd={self.fd} proxy={self.peer} buffered={self.parser.buffered_bytes}>"
        )


class HeaderErrors:
    """Counts of refused headers by reason, and warnings about them at a bounded rate.

    A broken or hostile proxy can fail thousands of headers a second: each is counted,
    and per reason one warning per LOG_EVERY_S says how many were not logged.
    """

    __slots__ = ("_logged_at", "_unlogged", "counts")

    def __init__(self, counts: dict[str, int] | None = None) -> None:
        # The service's totals (Counters.proxy_header_errors): they travel on restarts.
        self.counts: dict[str, int] = {} if counts is None else counts
        for reason in ALL_REASONS:  # every series exists (at 0) from the start
            self.counts.setdefault(reason, 0)
        self._logged_at: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}

    def record(self, reason: str, now: float, log: Any, **fields: Any) -> None:
        """Count one refused header; warn unless this reason was warned of lately."""
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self._unlogged[reason] = self._unlogged.get(reason, 0) + 1
        if now - self._logged_at.get(reason, -LOG_EVERY_S) < LOG_EVERY_S:
            return
        log.warning("proxy_header_refused", reason=reason, refused=self._unlogged[reason], **fields)
        self._logged_at[reason] = now
        self._unlogged[reason] = 0
