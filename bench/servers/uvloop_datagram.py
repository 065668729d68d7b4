"""UDP echo server on uvloop with the same DatagramProtocol as asyncio_datagram.py.

Usage: python uvloop_datagram.py [--port 0] [--backlog N (ignored)] (needs uvloop)
Prints {"event": "listening", "address": "udp:127.0.0.1:PORT"} once bound.
"""

from __future__ import annotations

import uvloop

# A sibling script, importable because Python puts the script's directory on sys.path.
from asyncio_datagram import parse_args, serve  # isort: skip

if __name__ == "__main__":
    args = parse_args()
    uvloop.run(serve("uvloop-datagram", args.port))
