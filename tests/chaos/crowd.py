"""A crowd: many open connections echoing in turn, some replaced all the time.

Each turn echoes a short line on the next open connection (checked), and every CHURN_EVERY
turns closes the oldest connection and opens a new one, so that with connection logging on
the daemon writes two lines per replacement. One thread, blocking sockets: simple, and the
crowd's own pace does not matter; what matters is that the daemon serves it while something
else goes wrong. Meant for a thread of its own (which may first enter a network namespace).
"""

from __future__ import annotations

import collections
import os
import socket
import threading
import time

IO_TIMEOUT_S = 10.0
CHURN_EVERY = 4
MAX_ERRORS_KEPT = 20


class Crowd:
    def __init__(self, host: str, port: int, size: int) -> None:
        self.host, self.port, self.size = host, port, size
        self.verified = 0
        self.replaced = 0
        self.errors: list[str] = []
        self.error_count = 0
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def _error(self, message: str) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_ERRORS_KEPT:
            self.errors.append(message)

    def _open(self) -> socket.socket | None:
        try:
            return socket.create_connection((self.host, self.port), timeout=IO_TIMEOUT_S)
        except OSError as e:
            self._error(f"connect failed: {e!r}")
            return None

    def _echo(self, sock: socket.socket) -> bool:
        line = os.urandom(12).hex().encode() + b"\n"
        try:
            sock.sendall(line)
            got = b""
            while len(got) < len(line):
                chunk = sock.recv(len(line) - len(got))
                if not chunk:
                    self._error(f"EOF after {len(got)} of {len(line)} bytes")
                    return False
                got += chunk
        except OSError as e:
            self._error(f"echo failed: {e!r}")
            return False
        if got != line:
            self._error("echo differs from what was sent")
            return False
        self.verified += len(line)
        return True

    def run(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        open_socks: collections.deque[socket.socket] = collections.deque()
        try:
            while len(open_socks) < self.size and not self._stop.is_set():
                sock = self._open()
                if sock is None:
                    return
                open_socks.append(sock)
            turn = 0
            while time.monotonic() < deadline and not self._stop.is_set() and open_socks:
                sock = open_socks.popleft()
                if not self._echo(sock):
                    sock.close()
                    return
                turn += 1
                if turn % CHURN_EVERY == 0:
                    sock.close()
                    replacement = self._open()
                    if replacement is None:
                        return
                    sock = replacement
                    self.replaced += 1
                open_socks.append(sock)
        finally:
            for sock in open_socks:
                sock.close()
