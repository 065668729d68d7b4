"""UDP echo server on asyncio with a DatagramProtocol: each datagram sent back to its source.

Usage: python asyncio_datagram.py [--port 0] [--backlog N (ignored)]
Prints {"event": "listening", "address": "udp:127.0.0.1:PORT"} once bound.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any


class EchoDatagramProtocol(asyncio.DatagramProtocol):
    """sendto() each datagram back; asyncio drops nothing itself but buffers on EAGAIN."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(data, addr)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--backlog", type=int, default=511)  # the runner passes it to all
    return parser.parse_args()


async def serve(name: str, port: int) -> None:
    """Bind 127.0.0.1:port (UDP), announce the bound address, serve until killed."""
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        EchoDatagramProtocol, local_addr=("127.0.0.1", port)
    )
    bound = transport.get_extra_info("sockname")
    event = {"event": "listening", "address": f"udp:{bound[0]}:{bound[1]}", "server": name}
    print(json.dumps(event), flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    args = parse_args()
    asyncio.run(serve("asyncio-datagram", args.port))
