"""TLS echo server on uvloop: asyncio_protocol.py's Protocol behind `ssl=` (uvloop's SSL
transport, over Python's ssl module with memory BIOs, as epolld's).

Usage: python uvloop_tls.py [--port 0] [--backlog 511] --cert CERT.pem --key KEY.pem
Prints {"event": "listening", "address": "127.0.0.1:PORT"} once bound.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl

import uvloop

# A sibling script, importable because Python puts the script's directory on sys.path.
from asyncio_protocol import EchoProtocol  # isort: skip


async def serve(port: int, backlog: int, context: ssl.SSLContext) -> None:
    """Listen on 127.0.0.1:port with TLS, announce the bound address, serve until killed."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(EchoProtocol, "127.0.0.1", port, backlog=backlog, ssl=context)
    bound = server.sockets[0].getsockname()
    event = {"event": "listening", "address": f"{bound[0]}:{bound[1]}", "server": "uvloop-tls"}
    print(json.dumps(event), flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--backlog", type=int, default=511)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    args = parser.parse_args()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(args.cert, args.key)
    # The client's order of suites, as epolld (tls/context.py) and Go: every server then
    # negotiates the AES-128-GCM that tlsload asks for first.
    context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    uvloop.run(serve(args.port, args.backlog, context))
