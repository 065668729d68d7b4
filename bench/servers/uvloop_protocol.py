"""Echo server on uvloop with the same Protocol as asyncio_protocol.py.

Usage: python uvloop_protocol.py [--port 0] [--backlog 511] (needs uvloop: the bench venv has it)
Prints {"event": "listening", "address": "127.0.0.1:PORT"} once bound.
"""

from __future__ import annotations

import uvloop

# A sibling script, importable because Python puts the script's directory on sys.path.
from asyncio_protocol import parse_args, serve  # isort: skip

if __name__ == "__main__":
    args = parse_args()
    uvloop.run(serve("uvloop-protocol", args.port, args.backlog))
