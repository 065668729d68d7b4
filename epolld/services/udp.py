"""discard and info on UDP: endpoint kinds beside udp/endpoint.py's echo.

Each takes the echo endpoint's checks and limits (truncated, not unicast, our own
address, the rate limiter) and changes what is sent:
- discard (RFC 863): nothing; the datagram's bytes are counted.
- info: the compact form (info.udp_reply, at most 512 bytes), sent only when the request
  is at least as long as the reply, so that it can never amplify (padding is the
  client's job); a shorter request is dropped and counted ("info_short").
UDP chargen does not exist here: config.py refuses it (a classic amplifier).
"""

from __future__ import annotations

import socket
from typing import Any, Final

from epolld.services import info
from epolld.udp.endpoint import NOT_UNICAST, TRUNCATED, UdpEndpoint, _not_unicast

INFO_SHORT: Final = "info_short"  # a drop reason: the request was shorter than the reply


class ServiceEndpoint(UdpEndpoint):
    """A service's endpoint takes datagrams one at a time (the echo's _echo() path): the
    recvmmsg/sendmmsg batches are echo's, and a service answers too few to need them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self._batched:
            self._batched = False
            self.set_max_datagram(self._size)  # closes the batch, makes the single buffer

    def set_faults(self, faults: Any) -> None:
        """info's drop and delay (config.py refuses faults on discard); one datagram at a
        time whether or not (UdpEndpoint.set_faults would batch again without them)."""
        if self.faults is not None:
            self.faults.close()
        self.faults = faults
        self._batched = False
        self.set_max_datagram(self._size)


class DiscardEndpoint(ServiceEndpoint):
    """Every admitted datagram is dropped and counted, none answered."""

    def _echo(self, nbytes: int, addr: Any) -> str | None:
        if nbytes > self._size:
            return TRUNCATED
        return self._discard(nbytes, addr)

    def _echo_from_destination(self, nbytes: int, ancdata: list[tuple[int, int, bytes]],
                               flags: int, addr: Any) -> str | None:  # fmt: skip
        if flags & socket.MSG_TRUNC:
            return TRUNCATED
        return self._discard(nbytes, addr)

    def _discard(self, nbytes: int, addr: Any) -> str | None:
        host, port = addr[0], addr[1]
        if _not_unicast(host, self._v6):
            return NOT_UNICAST
        reason = self._limiter.admit(host, port, nbytes, self._clock.now)
        if reason is None:
            bytes_ = self._stats.service_bytes
            bytes_["udp discard received"] = bytes_.get("udp discard received", 0) + nbytes
        return reason


class InfoEndpoint(ServiceEndpoint):
    """Each datagram at least as long as the reply is answered with the compact form."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stats.dropped.setdefault(INFO_SHORT, 0)

    def _echo(self, nbytes: int, addr: Any) -> str | None:
        if nbytes > self._size:
            return TRUNCATED
        size = self._reply(nbytes, addr)
        if size is None:
            return INFO_SHORT
        return self._sent(nbytes, size, super()._echo(size, addr))

    def _echo_from_destination(self, nbytes: int, ancdata: list[tuple[int, int, bytes]],
                               flags: int, addr: Any) -> str | None:  # fmt: skip
        if flags & socket.MSG_TRUNC:
            return TRUNCATED
        size = self._reply(nbytes, addr)
        if size is None:
            return INFO_SHORT
        return self._sent(nbytes, size, super()._echo_from_destination(size, ancdata, 0, addr))

    def _reply(self, nbytes: int, addr: Any) -> int | None:
        """Put the reply where the echo would send from; its size, or None if the request
        was shorter than it."""
        reply = info.udp_reply(self.listener.name, addr, self.sock.family)
        if nbytes < len(reply):
            return None
        self._view[: len(reply)] = reply
        return len(reply)

    def _sent(self, received: int, size: int, reason: str | None) -> str | None:
        if reason is None:
            counts = self._stats.service_bytes
            counts["udp info received"] = counts.get("udp info received", 0) + received
            counts["udp info sent"] = counts.get("udp info sent", 0) + size
        return reason


ENDPOINTS: Final[dict[str, type[UdpEndpoint]]] = {
    "discard": DiscardEndpoint,
    "info": InfoEndpoint,
}
