"""Echo server on asyncio with a Protocol: the fastest pure-asyncio way to echo.

Usage: python asyncio_protocol.py [--port 0] [--backlog 511]
Prints {"event": "listening", "address": "127.0.0.1:PORT"} once bound.
"""

from __future__ import annotations

import argparse
import asyncio
import json


class EchoProtocol(asyncio.Protocol):
    """Write back what arrives; stop reading while the write buffer is above its high water."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def pause_writing(self) -> None:
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--backlog", type=int, default=511)
    return parser.parse_args()


async def serve(name: str, port: int, backlog: int) -> None:
    """Listen on 127.0.0.1:port, announce the bound address, serve until killed."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(EchoProtocol, "127.0.0.1", port, backlog=backlog)
    bound = server.sockets[0].getsockname()
    event = {"event": "listening", "address": f"{bound[0]}:{bound[1]}", "server": name}
    print(json.dumps(event), flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    args = parse_args()
    asyncio.run(serve("asyncio-protocol", args.port, args.backlog))
