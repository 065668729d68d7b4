"""Echo server on asyncio streams (StreamReader/StreamWriter), the high-level API.

Usage: python asyncio_streams.py [--port 0] [--backlog 511]
Prints {"event": "listening", "address": "127.0.0.1:PORT"} once bound.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json

READ_SIZE = 256 * 1024  # bytes per read(), as epolld's default read size


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy the reader to the writer until EOF; drain() applies backpressure."""
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(READ_SIZE):
            writer.write(data)
            await writer.drain()
    writer.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--backlog", type=int, default=511)
    args = parser.parse_args()
    server = await asyncio.start_server(echo, "127.0.0.1", args.port, backlog=args.backlog)
    bound = server.sockets[0].getsockname()
    event = {"event": "listening", "address": f"{bound[0]}:{bound[1]}", "server": "asyncio-streams"}
    print(json.dumps(event), flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
