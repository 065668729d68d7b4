"""Exact echo through the real daemon: many clients, odd sizes, half-close, resets."""

from __future__ import annotations

import os
import random
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import StartDaemon
from tests.epolld_process import Daemon
from tests.traffic import connect, pump, recv_exactly, recv_until_eof, roundtrip

pytestmark = pytest.mark.slow


def test_line_echo(start_daemon: StartDaemon) -> None:
    """A line typed into a plain TCP client comes back unchanged."""
    daemon = start_daemon()
    with connect(daemon.port) as sock:
        roundtrip(sock, b"hello, echo\n")
        roundtrip(sock, bytes(range(256)))


def test_200_clients_pipelining_random_sizes(start_daemon: StartDaemon) -> None:
    """200 concurrent clients each pipeline random data up to 1 MiB and get it back byte-exact."""
    daemon = start_daemon()
    rng = random.Random(862)
    payloads = [rng.randbytes(rng.randint(1, 1 << 20)) for _ in range(200)]
    socks = [connect(daemon.port) for _ in payloads]
    try:
        got = pump(list(zip(socks, payloads, strict=True)), chunk=rng.choice([1000, 65536]))
    finally:
        for sock in socks:
            sock.close()
    for i, (payload, echo) in enumerate(zip(payloads, got, strict=True)):
        assert echo == payload, f"client {i}: {len(echo)} of {len(payload)} bytes, differs"


def test_one_byte_writes(start_daemon: StartDaemon) -> None:
    """A client writing one byte per send() gets every byte back, in order."""
    daemon = start_daemon()
    data = os.urandom(3000)
    with connect(daemon.port) as sock:
        got = bytearray()
        for i in range(len(data)):
            sock.send(data[i : i + 1])
            if i % 100 == 99:  # read as we go so nothing piles up
                got += recv_exactly(sock, i + 1 - len(got))
        got += recv_exactly(sock, len(data) - len(got))
    assert bytes(got) == data


def test_one_16_mib_write(start_daemon: StartDaemon) -> None:
    """One 16 MiB sendall() comes back whole."""
    daemon = start_daemon()
    data = os.urandom(16 << 20)
    with connect(daemon.port) as sock:
        [echo] = pump([(sock, data)])
    assert echo == data


def test_half_close_gets_whole_echo_then_eof(start_daemon: StartDaemon) -> None:
    """After the client's SHUT_WR the server flushes everything, then sends EOF."""
    daemon = start_daemon()
    data = os.urandom(4 << 20)
    with connect(daemon.port) as sock:
        [echo] = pump([(sock, data)], shut_write=True)
    assert echo == data  # pump read up to EOF: the EOF came after the whole echo
    closed = daemon.wait_for("connection_closed")
    assert closed[0]["reason"] == "eof"
    assert closed[0]["bytes_in"] == closed[0]["bytes_out"] == len(data)


def test_unix_socket_and_ipv6(start_daemon: StartDaemon, tmp_path: os.PathLike[str]) -> None:
    """Unix stream sockets and IPv6 listeners echo like IPv4 ones."""
    path = f"{tmp_path}/echo.sock"
    daemon = start_daemon({"listen": [f"unix:{path}", "[::1]:0"]})
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        roundtrip(sock, b"over a unix socket")
    v6 = next(a for a in daemon.addresses if a.startswith("["))
    with connect(int(v6.rsplit(":", 1)[1]), host="::1") as sock:
        roundtrip(sock, b"over ipv6")


def reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the kernel sends RST instead of FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_reset_while_output_pending(start_daemon: StartDaemon) -> None:
    """A peer that resets while the server holds its unsent echo is cleaned up; others go on."""
    daemon = start_daemon()
    sock = connect(daemon.port)
    sock.setblocking(False)
    sent = 0
    chunk = os.urandom(1 << 16)
    try:  # write without reading until both directions are full
        while sent < 256 << 20:
            sent += sock.send(chunk)
    except BlockingIOError:
        pass
    reset(sock)
    closed = daemon.wait_for("connection_closed")
    assert closed[0]["reason"] == "reset"
    with connect(daemon.port) as other:
        roundtrip(other, b"still serving")


def test_reader_never_reads_memory_bounded_then_full_echo(start_daemon: StartDaemon) -> None:
    """A client writing 1 GiB without reading keeps the server's memory bounded; it then gets
    every byte back in order."""
    daemon = start_daemon()
    total = 1 << 30
    block = os.urandom(1_000_003)  # a prime length: a lost or repeated chunk shows
    pattern = block * 2
    baseline = daemon.rss_bytes()
    with connect(daemon.port) as sock:
        sock.setblocking(False)
        sent = 0
        try:  # phase 1: write until the server stops taking data
            while True:
                offset = sent % len(block)
                sent += sock.send(pattern[offset : offset + (1 << 16)])
        except BlockingIOError:
            pass
        stalled_rss = daemon.rss_bytes()
        # phase 2: now read, while writing the rest of the gigabyte
        received = 0
        done_writing = threading.Event()

        def writer() -> None:
            nonlocal sent
            w = sock.dup()
            # Both objects share one file description, so both must use timeouts
            # (which make it O_NONBLOCK) rather than plain blocking mode.
            w.settimeout(30)
            with w:
                while sent < total:
                    offset = sent % len(block)
                    n = min(1 << 18, total - sent)
                    w.sendall(pattern[offset : offset + n])
                    sent += n
            done_writing.set()

        thread = threading.Thread(target=writer)
        thread.start()
        sock.settimeout(30)
        view = memoryview(pattern)
        while received < total:
            data = sock.recv(1 << 19)  # at most one block: the slice below stays in pattern
            assert data, f"EOF after {received} bytes"
            offset = received % len(block)
            assert data == view[offset : offset + len(data)], f"echo differs near byte {received}"
            received += len(data)
        thread.join(30)
        assert done_writing.is_set()
    peak = daemon.rss_bytes("VmHWM")
    assert stalled_rss - baseline < 32 << 20, f"RSS grew {stalled_rss - baseline} bytes"
    assert peak < 64 << 20, f"peak RSS {peak} bytes"


def test_rst_on_fresh_connections_leaves_no_fd(start_daemon: StartDaemon) -> None:
    """Connections reset right after connecting, or after sending, leave no descriptor behind."""
    daemon = start_daemon()
    with connect(daemon.port) as warm:
        roundtrip(warm, b"x")
    daemon.wait_for("connection_closed")
    baseline = daemon.fd_count()
    for i in range(200):
        sock = connect(daemon.port)
        if i % 2:
            sock.sendall(b"data before the reset")
        reset(sock)
    daemon.wait_for("connection_closed", count=201)
    assert daemon.fd_count() == baseline


def test_5000_mixed_lifecycles_fd_count_back_to_baseline(start_daemon: StartDaemon) -> None:
    """After 5,000 connections closed every way a peer can, the daemon holds as many fds as
    before."""
    daemon = start_daemon({"logging": {"level": "info"}})
    with connect(daemon.port) as warm:
        roundtrip(warm, b"x")
    wait_for_stats(daemon, lambda s: s["connections"] == 0)
    baseline = daemon.fd_count()
    rng = random.Random(5000)
    for i in range(5000):
        sock = connect(daemon.port)
        kind = i % 4
        if kind == 0:  # echo, then close
            roundtrip(sock, rng.randbytes(rng.randint(1, 2000)))
            sock.close()
        elif kind == 1:  # half-close with data
            sock.sendall(b"bye")
            sock.shutdown(socket.SHUT_WR)
            assert recv_until_eof(sock) == b"bye"
            sock.close()
        elif kind == 2:  # reset with unread echo pending
            sock.sendall(rng.randbytes(10000))
            reset(sock)
        else:  # connect and close without a word
            sock.close()
    # The daemon closes asynchronously: wait until the count settles at the baseline.
    wait_for_stats(daemon, lambda s: s["connections"] == 0 and s["accepted"] == 5001)
    assert daemon.fd_count() == baseline


def wait_for_stats(daemon: Daemon, wanted: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """Ask for stats with SIGUSR1 until they satisfy wanted (10 s at most)."""
    deadline = time.monotonic() + 10
    while True:
        before = len(daemon.events("stats"))
        daemon.signal(signal.SIGUSR1)
        stats = daemon.wait_for("stats", count=before + 1)[-1]
        if wanted(stats):
            return stats
        assert time.monotonic() < deadline, f"stats never as wanted: {stats}"
        time.sleep(0.05)


def test_half_close_while_paused_still_ends_with_eof(start_daemon: StartDaemon) -> None:
    """A peer whose FIN arrives while the daemon is not reading it (backpressure) still gets
    its whole echo and then EOF, once it reads: the FIN raises no new edge after the pause."""
    daemon = start_daemon(
        {"buffers": {"read_size": "16KiB", "high_water": "64KiB", "low_water": "16KiB"}}
    )
    # Sizes around what the buffers on both sides hold, so that for some of them the
    # whole payload and the FIN are queued at the daemon while it has paused the peer.
    for size in (96 << 10, 160 << 10, 256 << 10, 512 << 10, 1 << 20):
        data = os.urandom(size)
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", daemon.port))

            def writer(sock: socket.socket = sock, data: bytes = data) -> None:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)

            thread = threading.Thread(target=writer)
            thread.start()
            time.sleep(0.3)  # let both directions fill: the daemon pauses this peer
            echo = recv_until_eof(sock, timeout=10)
            thread.join(10)
        assert echo == data, f"{size} bytes: got {len(echo)}"
