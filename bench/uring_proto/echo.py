#!/usr/bin/env python3
"""The smallest TCP echo loop on io_uring (issue 25, step 1): a prototype to measure.

Multishot accept on the listener; per connection one multishot recv that picks buffers
from one provided-buffer ring; each received buffer is sent back from where it landed
(a send SQE pointing into the buffer), and returned to the ring when its send completes.
One send in flight per connection (the rest wait in order), short sends resubmit the
remainder, and a recv that ran out of buffers (ENOBUFS) is re-armed once one comes back.
One io_uring_enter per loop turn submits and reaps. No limits, timeouts or logs, like
bench/echo_server.c. Prints {"event": "listening", "address": "127.0.0.1:PORT", ...} once
bound, and {"event": "stats", ...} (enters, completions) on SIGTERM.

Usage: echo.py [--port 0] [--backlog 511] [--buffers 1024] [--buffer-size 16384]
"""

from __future__ import annotations

import argparse
import collections
import errno
import json
import signal
import socket
import sys
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ring as uring

ACCEPT, RECV, SEND = 1, 2, 3  # the low byte of user_data; then fd (32 bits), then buffer id
FD_MASK = 0xFFFFFFFF
BGID = 0


class Stop(Exception):
    pass


def _stop(_signum: int, _frame: FrameType | None) -> None:
    raise Stop


def shutdown(fd: int) -> None:
    """shutdown(SHUT_RDWR) of a descriptor we keep: its armed recv then ends."""
    sock = socket.socket(fileno=fd)
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.detach()


def serve(lsock: socket.socket, buffers: int, buffer_size: int) -> dict[str, int]:
    ring = uring.Ring(max(64, 2 * buffers))
    bufs = uring.BufRing(ring, BGID, buffers, buffer_size)
    base, size = bufs.base, bufs.size
    prep, enter, put = ring.prep, ring.enter, bufs.put
    cqe_at = uring.CQE.unpack_from
    rings, cqes, cq_mask, cq_head_i, cq_tail_i = (
        ring.rings, ring.cqes, ring.cq_mask, ring.cq_head_i, ring.cq_tail_i
    )  # fmt: skip
    u32 = ring.u32
    sq_room = ring.sq_entries - 8  # a turn flushes before the SQ fills
    # Per connection: the buffers waiting to be sent (bid, offset, length), the head of
    # which is in flight; per buffer: the offset and length left to send.
    queued: dict[int, collections.deque[tuple[int, int]]] = {}
    send_off = [0] * buffers
    send_left = [0] * buffers
    open_fds: set[int] = set()  # connections whose multishot recv is armed
    starved: list[int] = []  # recv ended with ENOBUFS: re-armed when a buffer is back
    stats = dict.fromkeys(("enters", "cqes", "short_sends", "enobufs"), 0)
    lfd = lsock.fileno()

    def arm_recv(fd: int) -> None:
        prep(uring.OP_RECV, fd, RECV | fd << 8, ioprio=uring.RECV_MULTISHOT,
             sqe_flags=uring.IOSQE_BUFFER_SELECT, buf_group=BGID)  # fmt: skip

    def finish(fd: int) -> None:
        """Close fd once its recv has ended and nothing is left to send."""
        if fd not in open_fds and not queued[fd]:
            del queued[fd]
            socket.close(fd)

    prep(uring.OP_ACCEPT, lfd, ACCEPT, ioprio=uring.ACCEPT_MULTISHOT)
    enters = cqe_count = 0
    try:
        while True:
            enter(1)
            enters += 1
            head, tail = u32[cq_head_i], u32[cq_tail_i]
            cqe_count += (tail - head) & FD_MASK
            recycled = False
            while head != tail:
                user_data, res, flags = cqe_at(rings, cqes + (head & cq_mask) * 16)
                head = (head + 1) & FD_MASK
                kind = user_data & 0xFF
                if kind == RECV:
                    fd = user_data >> 8
                    if res > 0:
                        bid = flags >> 16
                        send_off[bid], send_left[bid] = 0, res
                        q = queued[fd]
                        if not q:  # else a send is in flight: this one waits its turn
                            prep(uring.OP_SEND, fd, SEND | fd << 8 | bid << 40,
                                 base + bid * size, res)  # fmt: skip
                        q.append(bid)
                        if not flags & uring.CQE_F_MORE:
                            arm_recv(fd)
                    elif res == -errno.ENOBUFS:
                        stats["enobufs"] += 1
                        starved.append(fd)
                    else:  # EOF or an error: the multishot recv has ended
                        if flags & uring.CQE_F_BUFFER:
                            put(flags >> 16)
                            recycled = True
                        if not flags & uring.CQE_F_MORE:
                            open_fds.discard(fd)
                            finish(fd)
                elif kind == SEND:
                    fd = (user_data >> 8) & FD_MASK
                    bid = user_data >> 40
                    q = queued[fd]
                    if 0 < res < send_left[bid]:  # short send: the rest from where it stopped
                        stats["short_sends"] += 1
                        send_off[bid] += res
                        send_left[bid] -= res
                        prep(uring.OP_SEND, fd, user_data,
                             base + bid * size + send_off[bid], send_left[bid])  # fmt: skip
                        continue
                    put(bid)
                    recycled = True
                    q.popleft()
                    if res < 0:  # the peer is gone: drop what is queued; recv ends by itself
                        while q:
                            put(q.popleft())
                        shutdown(fd)
                    elif q:
                        nxt = q[0]
                        prep(uring.OP_SEND, fd, SEND | fd << 8 | nxt << 40,
                             base + nxt * size + send_off[nxt], send_left[nxt])  # fmt: skip
                    if not q:
                        finish(fd)
                elif kind == ACCEPT:
                    if res >= 0:
                        open_fds.add(res)
                        queued[res] = collections.deque()
                        arm_recv(res)
                    if not flags & uring.CQE_F_MORE:
                        prep(uring.OP_ACCEPT, lfd, ACCEPT, ioprio=uring.ACCEPT_MULTISHOT)
                if ring.pending() >= sq_room:
                    u32[cq_head_i] = head
                    enter(0, 0)
            u32[cq_head_i] = head
            if recycled:
                bufs.publish()
                while starved:
                    arm_recv(starved.pop())
    except Stop:
        pass
    stats["enters"], stats["cqes"] = enters, cqe_count
    bufs.close()
    ring.close()
    return stats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--backlog", type=int, default=511)
    parser.add_argument("--buffers", type=int, default=1024, help="a power of two")
    parser.add_argument("--buffer-size", type=int, default=16384)
    args = parser.parse_args()
    features = uring.probe()
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", args.port))
    lsock.listen(args.backlog)
    port = lsock.getsockname()[1]
    event = {"event": "listening", "address": f"127.0.0.1:{port}", "server": "uring-proto"}
    print(json.dumps({**event, "io_uring": features}), flush=True)
    stats = serve(lsock, args.buffers, args.buffer_size)
    print(json.dumps({"event": "stats", **stats}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
