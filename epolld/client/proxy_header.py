"""The PROXY protocol header (HAProxy's, versions 1 and 2) a client sends first, posing
as a load balancer, to test a `proxy_protocol` listener directly."""

from __future__ import annotations

import ipaddress
import struct

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_PROXY_COMMAND = 0x21  # version 2, command PROXY
V2_TCP4, V2_TCP6 = 0x11, 0x21


def build(version: str, source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """The header naming source as the client and destination as the address it reached.

    Both ends must be of one family; a destination of the other family (the client
    reached the server over IPv4 but poses as an IPv6 client) becomes the
    unspecified address of the source's family.

    Args:
        version: "v1" (text) or "v2" (binary).
        source: the (address, port) the header names as the client.
        destination: the (address, port) the header names as the server.
    """
    src = ipaddress.ip_address(source[0])
    dst = ipaddress.ip_address(destination[0])
    if dst.version != src.version:
        dst = ipaddress.ip_address("::" if src.version == 6 else "0.0.0.0")
    if version == "v1":
        family = "TCP4" if src.version == 4 else "TCP6"
        return f"PROXY {family} {src} {dst} {source[1]} {destination[1]}\r\n".encode()
    family_byte = V2_TCP4 if src.version == 4 else V2_TCP6
    addresses = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1])
    return (
        V2_SIGNATURE
        + struct.pack("!BBH", V2_PROXY_COMMAND, family_byte, len(addresses))
        + (addresses)
    )


def parse_source(text: str) -> tuple[str, int]:
    """ADDR:PORT or [ADDR]:PORT with a literal address; ValueError if not."""
    host, colon, port_text = text.rpartition(":")
    if not colon or not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise ValueError(f"not ADDR:PORT: {text!r}")
    host = host.removeprefix("[").removesuffix("]")
    return str(ipaddress.ip_address(host)), int(port_text)
