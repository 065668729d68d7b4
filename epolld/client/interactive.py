"""Interactive mode, the spirit of the epoll teaching example epolld grew from: it
prompts "Input Something:", sends the line and prints "Receive: ..." with the echo.
With stdin piped it prints only the echoes, so ``printf 'a\\nb\\n' | epolld-client``
prints ``a`` and ``b``."""

from __future__ import annotations

import sys

from epolld.client.connect import Options, Target, connect, finish
from epolld.client.engine import Connection, run

STDIN_LINE_MAX = 64 * 1024  # bytes per interactive send; longer lines go in pieces


def run_interactive(target: Target, timeout: float | None, options: Options) -> None:
    """Echo stdin lines through the server: prompted on a terminal, plain when piped.

    Raises:
        ClientError: the connection failed.
    """
    terminal = sys.stdin.isatty()
    with connect(target, timeout, options) as sock:
        connection = Connection(sock, str(target), window=None)
        if terminal:
            print(f"Connected to {target}. Ctrl-D ends.", file=sys.stderr)
        while True:
            if terminal:
                try:
                    line = input("Input Something: ")
                except EOFError:
                    print(file=sys.stderr)  # end the prompt's line
                    break
                data = (line + "\n").encode()
            else:
                data = sys.stdin.buffer.readline(STDIN_LINE_MAX)
                if not data:
                    break
            connection.feed(iter([data]), collect=True)
            run([connection], timeout)
            echo = bytes(connection.completed.pop().echo or b"")
            if terminal:
                print(f"Receive: {echo.decode(errors='replace').removesuffix(chr(10))}")
            else:
                sys.stdout.buffer.write(echo)
                sys.stdout.buffer.flush()
        finish(sock)  # Ctrl-D: tell the server we are done
