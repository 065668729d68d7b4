"""What the info service says of a client: one line of JSON (TCP), or a compact form of
at most UDP_MAX_BYTES for a datagram. Without sockets: the callers pass what they saw.

TCP line, keys always present (null when not applicable):
  service, host, epolld, pid, worker, listener, transport,
  client {address, port}  who the client is: behind a PROXY header the header's source
  peer {address, port}    the TCP peer as the kernel sees it (the proxy, when proxied)
  local {address, port}   our end as the kernel sees it
  proxy {version, source, destination} | null   what the PROXY header named
  tls {version, cipher, sni, client_subject} | null
A UDP reply has service, host, epolld, pid, worker, listener, transport and client.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any, Final

from epolld import __version__

UDP_MAX_BYTES: Final = 512
HOST_MAX_CHARS: Final = 64  # HOST_NAME_MAX; the UDP form must stay under its bound

# The worker index when this process is worker N of a supervisor (workers/worker.py
# sets it at fork), None for a single process.
worker: int | None = None


def endpoint(family: int, addr: Any) -> dict[str, Any]:
    """{address, port} of a socket address (a Unix socket has neither)."""
    if family in (socket.AF_INET, socket.AF_INET6) and isinstance(addr, tuple):
        return {"address": addr[0], "port": addr[1]}
    return {"address": "unix", "port": None}


def _identity(listener: str, transport: str) -> dict[str, Any]:
    return {
        "service": "info",
        "host": socket.gethostname()[:HOST_MAX_CHARS],
        "epolld": __version__,
        "pid": os.getpid(),
        "worker": worker,
        "listener": listener,
        "transport": transport,
    }


def tcp_fields(sock: socket.socket, listener: str, header: Any = None) -> dict[str, Any]:
    """What a TCP (or Unix) connection looks like from here; header: its PROXY header.

    Raises:
        OSError: the socket is no longer connected.
    """
    peer = endpoint(sock.family, sock.getpeername())
    fields = _identity(listener, "tcp" if sock.family != socket.AF_UNIX else "unix")
    fields["client"] = peer
    fields["peer"] = peer
    fields["local"] = endpoint(sock.family, sock.getsockname())
    fields["proxy"] = None
    if header is not None:
        fields["proxy"] = {
            "version": header.version,
            "source": _address(header.source),
            "destination": _address(header.destination),
        }
        if header.source is not None:
            fields["client"] = _address(header.source)
    fields["tls"] = None
    return fields


def _address(pair: tuple[str, int] | None) -> dict[str, Any] | None:
    return None if pair is None else {"address": pair[0], "port": pair[1]}


def line(fields: dict[str, Any]) -> bytes:
    """The fields as one line of JSON, LF-terminated."""
    return json.dumps(fields, separators=(",", ":")).encode() + b"\n"


def udp_reply(listener: str, addr: Any, family: int) -> bytes:
    """The compact form for a datagram from addr: at most UDP_MAX_BYTES."""
    fields = _identity(listener, "udp")
    fields["client"] = endpoint(family, addr)
    reply = line(fields)
    if len(reply) > UDP_MAX_BYTES:  # a listener name longer than any address: cut it
        fields["listener"] = None
        reply = line(fields)
    return reply
