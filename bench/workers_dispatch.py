#!/usr/bin/env python3
"""How connections reach worker processes: shared listener + EPOLLEXCLUSIVE vs one
SO_REUSEPORT listener per worker, held open by the parent or by its worker only,
measured on loopback.

For each mode: N workers (each an epoll loop that answers every connection with its
index), then 1,000 sequential connections (the spread), then a worker is SIGKILLed
while 50 connections wait in the backlog and a new worker takes its place: how many of
those 50 are answered, and how many reset.

    python3 bench/workers_dispatch.py [--workers 2] [--connections 1000]

This is the measurement behind supervisor.py's choice; it does not use epolld itself.
"""

from __future__ import annotations

import argparse
import collections
import os
import select
import signal
import socket
import time


def serve(index: int, listener: socket.socket, exclusive: bool) -> None:
    ep = select.epoll()
    ep.register(listener.fileno(), select.EPOLLIN | (select.EPOLLEXCLUSIVE if exclusive else 0))
    while True:
        for _ in ep.poll():
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                continue
            conn.setblocking(True)
            conn.sendall(bytes([index]))
            conn.close()


ALL_SOCKETS: list[socket.socket] = []


def spawn(index: int, listener: socket.socket, exclusive: bool) -> int:
    pid = os.fork()
    if pid == 0:
        for other in ALL_SOCKETS:  # the other workers' listeners are not this one's
            if other is not listener:
                other.close()
        try:
            serve(index, listener, exclusive)
        finally:
            os._exit(0)
    return pid


def ask(port: int) -> int | None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        try:
            data = s.recv(1)
        except (ConnectionResetError, TimeoutError):
            return None
        return data[0] if data else None


def measure(mode: str, workers: int, connections: int) -> None:
    exclusive = mode == "exclusive"
    sockets = ALL_SOCKETS
    sockets.clear()
    count = 1 if exclusive else workers
    port = 0
    for _ in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", port))
        port = s.getsockname()[1]
        s.listen(511)
        s.setblocking(False)
        sockets.append(s)
    pids = [spawn(i, sockets[0 if exclusive else i], exclusive) for i in range(workers)]
    held = mode != "reuseport-unheld"
    if not held:  # each worker's socket is its own: it closes when the worker dies
        for s in sockets:
            s.close()
    time.sleep(0.3)
    spread = collections.Counter(ask(port) for _ in range(connections))
    # Stop worker 0 and queue connections meanwhile; its replacement (or the others) answer.
    os.kill(pids[0], signal.SIGSTOP)
    waiting = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(50)]
    os.kill(pids[0], signal.SIGKILL)
    os.waitpid(pids[0], 0)
    if not held:
        sockets.clear()
        sockets.append(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        sockets[0].setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sockets[0].bind(("127.0.0.1", port))
        sockets[0].listen(511)
        sockets[0].setblocking(False)
    pids[0] = spawn(0, sockets[0], exclusive)
    answered = reset = 0
    for s in waiting:
        try:
            answered += bool(s.recv(1))
        except (ConnectionResetError, TimeoutError):
            reset += 1
        s.close()
    time.sleep(0.1)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    for s in sockets:
        s.close()
    shares = {f"worker{k}": v for k, v in sorted(spread.items(), key=lambda kv: str(kv[0]))}
    print(f"{mode:10} spread of {connections}: {shares}; queued on a killed worker: "
          f"{answered}/50 answered, {reset} reset")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--connections", type=int, default=1000)
    modes = ["exclusive", "reuseport", "reuseport-unheld"]
    parser.add_argument("--modes", nargs="+", default=modes)
    args = parser.parse_args()
    for mode in args.modes:
        measure(mode, args.workers, args.connections)


if __name__ == "__main__":
    main()
