"""The PROXY header parser on bytes alone: valid and invalid v1 and v2 headers, any split."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epolld.tcp.proxy import (
    MAX_KEPT_BYTES,
    REASONS,
    V1_MAX_BYTES,
    V2_SIGNATURE,
    HeaderParser,
    Parsed,
    ProxyHeader,
    ProxyHeaderError,
    parse,
)

PAYLOAD = b"echo me\r\n"


def v2(
    command: int = 1,
    family: int = 0x11,
    addresses: bytes = b"",
    tlvs: bytes = b"",
    version: int = 2,
    length: int | None = None,
) -> bytes:
    """A v2 header built field by field; length defaults to what follows the fixed part."""
    body = addresses + tlvs
    size = len(body) if length is None else length
    return V2_SIGNATURE + bytes([version << 4 | command, family]) + struct.pack("!H", size) + body


def inet4(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (
        ipaddress.IPv4Address(src).packed
        + ipaddress.IPv4Address(dst).packed
        + struct.pack("!HH", sport, dport)
    )


def inet6(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (
        ipaddress.IPv6Address(src).packed
        + ipaddress.IPv6Address(dst).packed
        + struct.pack("!HH", sport, dport)
    )


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


def feed_in_chunks(data: bytes, sizes: list[int]) -> tuple[Parsed | None, bytes]:
    """Feed data cut into pieces of the given sizes (the last piece takes what is left).

    Returns the Parsed (or None) and the bytes after the header collected from the chunk
    that completed it plus every chunk not fed.
    """
    parser = HeaderParser()
    position = 0
    for size in [*sizes, len(data)]:
        piece = data[position : position + max(size, 1)]
        position += len(piece)
        result = parser.feed(piece)
        if result is not None:
            return result, result.rest + data[position:]
        if position >= len(data):
            break
    return None, b""


def reason_of(data: bytes, chunk: int | None = None) -> str:
    """The reason feeding data (whole, or chunk bytes at a time) is refused with."""
    parser = HeaderParser()
    step = chunk or len(data)
    for i in range(0, len(data), step):
        try:
            result = parser.feed(data[i : i + step])
        except ProxyHeaderError as e:
            error = e
            break
        assert result is None, f"{data!r} was accepted"
    else:
        raise AssertionError(f"{data!r} was not refused")
    assert error.reason in REASONS
    return error.reason


VALID = [
    pytest.param(
        b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 7080\r\n",
        ProxyHeader(1, "proxy", "tcp4", ("192.0.2.1", 56324), ("198.51.100.2", 7080), 46),
        id="v1-tcp4",
    ),
    pytest.param(
        b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n",
        ProxyHeader(1, "proxy", "tcp4", ("0.0.0.0", 0), ("255.255.255.255", 65535), 44),
        id="v1-tcp4-extremes",
    ),
    pytest.param(
        b"PROXY TCP6 2001:DB8::1 ::1 1 2\r\n",
        ProxyHeader(1, "proxy", "tcp6", ("2001:db8::1", 1), ("::1", 2), 32),
        id="v1-tcp6-normalized",
    ),
    pytest.param(
        b"PROXY TCP6 ::ffff:192.0.2.7 ::1 1 2\r\n",
        ProxyHeader(1, "proxy", "tcp6", ("192.0.2.7", 1), ("::1", 2), 37),
        id="v1-tcp6-v4-mapped-is-ipv4",
    ),
    pytest.param(
        b"PROXY UNKNOWN\r\n", ProxyHeader(1, "proxy", "unknown", None, None, 15), id="v1-unknown"
    ),
    pytest.param(
        b"PROXY UNKNOWN anything \xff goes\r\n",
        ProxyHeader(1, "proxy", "unknown", None, None, 31),
        id="v1-unknown-ignores-the-rest",
    ),
    pytest.param(
        b"PROXY UNKNOWN " + b"f" * (V1_MAX_BYTES - 16) + b"\r\n",
        ProxyHeader(1, "proxy", "unknown", None, None, V1_MAX_BYTES),
        id="v1-107-bytes",
    ),
    pytest.param(
        v2(addresses=inet4("203.0.113.9", "10.0.0.2", 40000, 7080)),
        ProxyHeader(2, "proxy", "tcp4", ("203.0.113.9", 40000), ("10.0.0.2", 7080), 28),
        id="v2-tcp4",
    ),
    pytest.param(
        v2(family=0x21, addresses=inet6("2001:db8::5", "2001:db8::6", 1, 65535)),
        ProxyHeader(2, "proxy", "tcp6", ("2001:db8::5", 1), ("2001:db8::6", 65535), 52),
        id="v2-tcp6",
    ),
    pytest.param(
        v2(family=0x21, addresses=inet6("::ffff:198.51.100.1", "::1", 5, 6)),
        ProxyHeader(2, "proxy", "tcp6", ("198.51.100.1", 5), ("::1", 6), 52),
        id="v2-tcp6-v4-mapped-is-ipv4",
    ),
    pytest.param(
        v2(
            addresses=inet4("192.0.2.1", "192.0.2.2", 3, 4),
            tlvs=tlv(0x01, b"h2")
            + tlv(0x02, b"example.org")
            + tlv(0x03, b"\0\0\0\0")
            + tlv(0x04, b"")
            + tlv(0x05, b"u" * 128)
            + tlv(0x20, b"\x01\0\0\0\0" + tlv(0x21, b"TLSv1.3"))
            + tlv(0x30, b"netns")
            + tlv(0xE0, b"custom")
            + tlv(0xFF, b"future"),
        ),
        ProxyHeader(2, "proxy", "tcp4", ("192.0.2.1", 3), ("192.0.2.2", 4), 232),
        id="v2-tcp4-known-and-unknown-tlvs",
    ),
    pytest.param(
        v2(addresses=inet4("192.0.2.1", "192.0.2.2", 3, 4), tlvs=tlv(0xEE, b"x" * 65000)),
        ProxyHeader(2, "proxy", "tcp4", ("192.0.2.1", 3), ("192.0.2.2", 4), 16 + 12 + 65003),
        id="v2-one-huge-tlv",
    ),
    pytest.param(
        v2(command=0, family=0), ProxyHeader(2, "local", "unspec", None, None, 16), id="v2-local"
    ),
    pytest.param(
        v2(command=0, family=0xFF, addresses=b"ignored, family too"),
        ProxyHeader(2, "local", "unspec", None, None, 35),
        id="v2-local-ignores-the-block",
    ),
    pytest.param(
        v2(family=0x00, addresses=b"\x01\x02\x03"),
        ProxyHeader(2, "proxy", "unspec", None, None, 19),
        id="v2-proxy-unspec",
    ),
    pytest.param(
        v2(family=0x12, addresses=inet4("192.0.2.1", "192.0.2.2", 53, 53)),
        ProxyHeader(2, "proxy", "udp4", None, None, 28),
        id="v2-udp4-falls-back",
    ),
    pytest.param(
        v2(family=0x31, addresses=b"/src".ljust(108, b"\0") + b"/dst".ljust(108, b"\0")),
        ProxyHeader(2, "proxy", "unix_stream", None, None, 232),
        id="v2-unix-falls-back",
    ),
]


@pytest.mark.parametrize(("data", "expected"), VALID)
def test_valid_header_whole(data: bytes, expected: ProxyHeader) -> None:
    """A valid header fed at once gives its fields, and the payload after it is returned."""
    assert parse(data + PAYLOAD) == Parsed(expected, PAYLOAD)


@pytest.mark.parametrize(("data", "expected"), VALID)
def test_valid_header_one_byte_at_a_time(data: bytes, expected: ProxyHeader) -> None:
    """Fed one byte at a time, every byte but the last gives need-more, then the header."""
    parser = HeaderParser()
    for i in range(len(data) - 1):
        assert parser.feed(data[i : i + 1]) is None
        assert parser.buffered_bytes <= MAX_KEPT_BYTES
    assert parser.feed(data[-1:]) == Parsed(expected, b"")


@pytest.mark.parametrize(("data", "expected"), [p for p in VALID if len(p.values[0]) < 300])
def test_valid_header_every_split(data: bytes, expected: ProxyHeader) -> None:
    """Cut in two at any point, with payload after it, a header parses the same."""
    for cut in range(1, len(data) + len(PAYLOAD)):
        result, rest = feed_in_chunks(data + PAYLOAD, [cut])
        assert result is not None, cut
        assert (result.header, rest) == (expected, PAYLOAD), cut


def test_v2_wanted_never_reaches_the_payload() -> None:
    """Reading a v2 header `wanted` bytes at a time leaves every payload byte unread."""
    data = v2(addresses=inet4("192.0.2.1", "192.0.2.2", 3, 4), tlvs=tlv(0x05, b"id" * 20))
    stream = data + PAYLOAD
    parser = HeaderParser()
    position = 0
    while True:
        want = parser.wanted
        assert 0 < want <= len(data) - position
        result = parser.feed(stream[position : position + want])
        position += want
        if result is not None:
            break
    assert (position, result.rest) == (len(data), b"")


def test_wanted_before_any_byte_fits_the_shortest_header() -> None:
    """The first read asks for no more than the shortest header (v1 UNKNOWN, 15 bytes)."""
    assert HeaderParser().wanted <= len(b"PROXY UNKNOWN\r\n")


INVALID = [
    pytest.param(b"GET / HTTP/1.1\r\n", "not_proxy_protocol", id="http"),
    pytest.param(b"\x16\x03\x01\x02\x00", "not_proxy_protocol", id="tls"),
    pytest.param(b"PROXZ TCP4", "not_proxy_protocol", id="v1-bad-prefix"),
    pytest.param(b"PROXY\r\n", "not_proxy_protocol", id="v1-no-space"),
    pytest.param(b"\r\n\r\n\x00\r\nQUIZ\n\x21\x11\x00\x00", "not_proxy_protocol", id="v2-bad-sig"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "v1_malformed", id="v1-lf-only"),
    pytest.param(b"PROXY TCP4 1.2.3.4\r5.6.7.8 1 2\r\n", "v1_malformed", id="v1-lone-cr"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n", "v1_malformed", id="v1-cr-cr-lf"),
    pytest.param(b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "v1_malformed", id="v1-bad-protocol"),
    pytest.param(b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n", "v1_malformed", id="v1-lowercase"),
    pytest.param(b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "v1_malformed", id="v1-two-spaces"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "v1_malformed", id="v1-missing-port"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "v1_malformed", id="v1-extra-field"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "v1_malformed", id="v1-trailing-space"),
    pytest.param(b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "v1_malformed", id="v1-octal-looking"),
    pytest.param(b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", "v1_malformed", id="v1-octet-256"),
    pytest.param(b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "v1_malformed", id="v1-three-octets"),
    pytest.param(b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "v1_malformed", id="v1-tcp4-with-ipv6"),
    pytest.param(b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "v1_malformed", id="v1-tcp6-with-ipv4"),
    pytest.param(b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "v1_malformed", id="v1-scope-id"),
    pytest.param(b"PROXY TCP6 1::2::3 ::1 1 2\r\n", "v1_malformed", id="v1-two-double-colons"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "v1_malformed", id="v1-port-65536"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 080 2\r\n", "v1_malformed", id="v1-port-zero-led"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "v1_malformed", id="v1-port-negative"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 \xd9\xa1 2\r\n", "v1_malformed", id="v1-port-utf8"),
    pytest.param(b"PROXY UNKNOWNX\r\n", "v1_malformed", id="v1-unknownx"),
    pytest.param(b"PROXY UNKNOWN " + b"f" * 92 + b"\r\n", "v1_too_long", id="v1-108-bytes"),
    pytest.param(b"PROXY " + b"A" * 200, "v1_too_long", id="v1-no-crlf"),
    pytest.param(v2(version=1), "v2_bad_version", id="v2-version-1"),
    pytest.param(v2(version=3), "v2_bad_version", id="v2-version-3"),
    pytest.param(v2(command=2), "v2_bad_command", id="v2-command-2"),
    pytest.param(v2(command=0xF), "v2_bad_command", id="v2-command-15"),
    pytest.param(v2(family=0x41, addresses=bytes(12)), "v2_bad_family", id="v2-family-4"),
    pytest.param(v2(family=0x13, addresses=bytes(12)), "v2_bad_family", id="v2-transport-3"),
    pytest.param(v2(family=0x11, addresses=bytes(11)), "v2_short_address", id="v2-short-inet"),
    pytest.param(v2(family=0x21, addresses=bytes(12)), "v2_short_address", id="v2-short-inet6"),
    pytest.param(v2(family=0x31, addresses=bytes(200)), "v2_short_address", id="v2-short-unix"),
    pytest.param(
        v2(addresses=inet4("1.2.3.4", "5.6.7.8", 1, 2), tlvs=b"\x05\x00\x09abc"),
        "v2_bad_tlv",
        id="v2-tlv-past-the-end",
    ),
    pytest.param(
        v2(addresses=inet4("1.2.3.4", "5.6.7.8", 1, 2), tlvs=tlv(1, b"h2") + b"\x05\x00"),
        "v2_bad_tlv",
        id="v2-ends-inside-tlv-head",
    ),
    pytest.param(
        v2(addresses=inet4("1.2.3.4", "5.6.7.8", 1, 2), tlvs=b"\x05\xff\xff"),
        "v2_bad_tlv",
        id="v2-tlv-of-64k-in-a-short-header",
    ),
]


@pytest.mark.parametrize(("data", "reason"), INVALID)
def test_invalid_header_reason(data: bytes, reason: str) -> None:
    """An invalid header is refused with its reason, whole or one byte at a time."""
    assert reason_of(data) == reason
    assert reason_of(data, chunk=1) == reason


def test_not_a_proxy_is_refused_at_its_first_byte() -> None:
    """A client that does not speak the protocol is refused at the first wrong byte."""
    for first in (b"G", b"\x00", b"\n", b"p"):
        with pytest.raises(ProxyHeaderError):
            HeaderParser().feed(first)
    parser = HeaderParser()
    for byte in b"PROX":
        assert parser.feed(bytes([byte])) is None
    with pytest.raises(ProxyHeaderError, match="PROXZ"):
        parser.feed(b"Z")


def test_v2_bad_version_is_refused_before_the_length_arrives() -> None:
    """The version nibble is checked as soon as its byte arrives."""
    with pytest.raises(ProxyHeaderError) as info:
        HeaderParser().feed(V2_SIGNATURE + b"\x31")
    assert info.value.reason == "v2_bad_version"


def test_v1_line_without_crlf_is_refused_at_107_bytes() -> None:
    """A v1 line is refused as soon as 107 bytes hold no line end, not later."""
    parser = HeaderParser()
    assert parser.feed(b"PROXY " + b"x" * 100) is None
    with pytest.raises(ProxyHeaderError) as info:
        parser.feed(b"x")
    assert info.value.reason == "v1_too_long"


def test_v1_payload_in_the_same_chunk_is_returned_not_parsed() -> None:
    """Bytes after the CRLF, even another header or a bare LF, are payload."""
    line = b"PROXY UNKNOWN\r\n"
    assert parse(line + line + b"\n") == Parsed(
        ProxyHeader(1, "proxy", "unknown", None, None, 15), line + b"\n"
    )


def test_feed_after_completion_is_a_bug() -> None:
    """A caller that feeds a finished parser gets a RuntimeError, not a second header."""
    parser = HeaderParser()
    assert parser.feed(b"PROXY UNKNOWN\r\n") is not None
    with pytest.raises(RuntimeError):
        parser.feed(b"x")


def test_empty_chunk_is_need_more() -> None:
    """An empty chunk changes nothing."""
    parser = HeaderParser()
    assert parser.feed(b"") is None
    assert parser.feed(b"PROXY UNKNOWN\r\n") is not None


# --- property tests ----------------------------------------------------------------------

FUZZ = settings(max_examples=400, deadline=None)
SPLITS = st.lists(st.integers(min_value=1, max_value=40), max_size=12)


def run_fuzz(data: bytes, sizes: list[int]) -> Parsed | None:
    """Feed data in chunks; only None, a Parsed or a ProxyHeaderError may come out."""
    parser = HeaderParser()
    position = 0
    for size in [*sizes, len(data)]:
        piece = data[position : position + size]
        position += len(piece)
        try:
            result = parser.feed(piece)
        except ProxyHeaderError as e:
            error = e
            break
        assert parser.buffered_bytes <= MAX_KEPT_BYTES
        if result is not None:
            assert isinstance(result, Parsed)
            assert result.header.length <= position
            assert result.rest == data[result.header.length : position]
            return result
        if position >= len(data):
            return None
    else:
        return None
    assert error.reason in REASONS, error.reason
    assert str(error)
    return None


@FUZZ
@given(st.binary(max_size=300), SPLITS)
def test_fuzz_random_bytes(data: bytes, sizes: list[int]) -> None:
    """Random bytes in random chunks give need-more, a header, or the one error type."""
    run_fuzz(data, sizes)


@FUZZ
@given(st.binary(max_size=300), SPLITS)
def test_fuzz_random_bytes_after_a_signature(data: bytes, sizes: list[int]) -> None:
    """Random bytes after either signature reach the version-specific code the same way."""
    run_fuzz(b"PROXY " + data, sizes)
    run_fuzz(V2_SIGNATURE + data, sizes)
    run_fuzz(V2_SIGNATURE + b"\x21" + data, sizes)


VALID_BYTES = [p.values[0] for p in VALID if len(p.values[0]) < 300]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid header with bytes flipped, deleted, inserted, or cut short."""
    data = bytearray(draw(st.sampled_from(VALID_BYTES)))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        where = draw(st.integers(min_value=0, max_value=max(0, len(data) - 1)))
        action = draw(st.sampled_from(["flip", "delete", "insert", "truncate"]))
        if action == "flip" and data:
            data[where] ^= 1 << draw(st.integers(min_value=0, max_value=7))
        elif action == "delete" and data:
            del data[where]
        elif action == "insert":
            data.insert(where, draw(st.integers(min_value=0, max_value=255)))
        else:
            del data[where:]
    return bytes(data)


@FUZZ
@given(mutated(), SPLITS)
def test_fuzz_mutated_headers(data: bytes, sizes: list[int]) -> None:
    """Mutated headers are accepted only if they still parse whole; header bytes never leak."""
    result = run_fuzz(data + PAYLOAD, sizes)
    if result is not None:
        # What one split accepts, the whole accepts identically, with the same payload.
        stream = data + PAYLOAD
        assert parse(stream) == Parsed(result.header, stream[result.header.length :])


ipv4s = st.builds(ipaddress.IPv4Address, st.integers(min_value=0, max_value=2**32 - 1))
ipv6s = st.builds(ipaddress.IPv6Address, st.integers(min_value=0, max_value=2**128 - 1))
ports = st.integers(min_value=0, max_value=65535)
tlvs = st.lists(
    st.builds(tlv, st.integers(min_value=0, max_value=255), st.binary(max_size=40)), max_size=5
).map(b"".join)


def expected_text(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped or address)


@st.composite
def generated(draw: st.DrawFn) -> tuple[bytes, ProxyHeader]:
    """A valid v1 or v2 header of random addresses and ports (v2 with random TLVs)."""
    six = draw(st.booleans())
    src, dst = draw(ipv6s if six else ipv4s), draw(ipv6s if six else ipv4s)
    sport, dport = draw(ports), draw(ports)
    family = "tcp6" if six else "tcp4"
    if draw(st.booleans()):
        protocol = b"TCP6" if six else b"TCP4"
        line = b"PROXY %s %s %s %d %d\r\n" % (
            protocol,
            src.compressed.encode(),
            dst.compressed.encode(),
            sport,
            dport,
        )
        version = 1
        data = line
    else:
        block = (inet6 if six else inet4)(str(src), str(dst), sport, dport)
        data = v2(family=0x21 if six else 0x11, addresses=block, tlvs=draw(tlvs))
        version = 2
    header = ProxyHeader(
        version,  # type: ignore[arg-type]
        "proxy",
        family,  # type: ignore[arg-type]
        (expected_text(src), sport),
        (expected_text(dst), dport),
        len(data),
    )
    return data, header


@FUZZ
@given(generated(), st.binary(max_size=50), SPLITS)
def test_fuzz_generated_headers_parse_exactly(
    case: tuple[bytes, ProxyHeader], payload: bytes, sizes: list[int]
) -> None:
    """Any valid header, split anywhere, gives its addresses and exactly the payload after it."""
    data, header = case
    result, rest = feed_in_chunks(data + payload, sizes)
    assert result is not None
    assert (result.header, rest) == (header, payload)


def test_lone_cr_is_refused_at_every_split() -> None:
    """A lone CR inside a v1 line is refused however the bytes are split, also when it is
    the second-to-last byte of a chunk without the LF (hypothesis found that split)."""
    data = b"PROXY UNKNOWN anyth\ring \xff goes\r\n" + PAYLOAD
    for i in range(1, len(data)):
        with pytest.raises(ProxyHeaderError, match="a CR that does not end the line"):
            feed_split(data, i)


def feed_split(data: bytes, at: int) -> None:
    """Feed data to a new parser in two chunks, split at `at`."""
    parser = HeaderParser()
    for chunk in (data[:at], data[at:]):
        parser.feed(chunk)
