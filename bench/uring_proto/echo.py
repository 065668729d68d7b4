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

# user_data: the kind in the low byte, then the fd (24 bits), for a send also the buffer id
# (16 bits) and the bytes it sends (16 bits), so that a completion needs no lookup.
ACCEPT, RECV, SEND = 1, 2, 3
FD_MASK = 0xFFFFFF
U32 = 0xFFFFFFFF
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
    """The loop; the hot path (recv and send completions) writes SQEs and buffer-ring
    entries inline, with everything it touches in local variables."""
    if buffer_size > 0xFFFF:
        raise ValueError("--buffer-size must fit the 16 bits of user_data it has")
    ring = uring.Ring(max(64, 2 * buffers))
    bufs = uring.BufRing(ring, BGID, buffers, buffer_size)
    base, size, br, br_mask = bufs.base, bufs.size, bufs.ring_mem, bufs.mask
    sqes, sq_mask, rings, cqes, cq_mask = (
        ring.sqes,
        ring.sq_mask,
        ring.rings,
        ring.cqes,
        ring.cq_mask,
    )
    u32, cq_head_i, cq_tail_i = ring.u32, ring.cq_head_i, ring.cq_tail_i
    sqe_pack, buf_pack, cqe_at = uring.SQE.pack_into, uring.BUF.pack_into, uring.CQE.unpack_from
    enter = ring.enter
    op_send, f_more, f_buffer = uring.OP_SEND, uring.CQE_F_MORE, uring.CQE_F_BUFFER
    sq_room = ring.sq_entries - 8  # a turn flushes before the SQ fills
    # Per connection, in order: the sends (bid | length << 16), the first of them in flight.
    queued: dict[int, collections.deque[int]] = {}
    offsets: dict[int, int] = {}  # bid -> bytes already sent, only after a short send
    open_fds: set[int] = set()  # connections whose multishot recv is armed
    starved: list[int] = []  # recv ended with ENOBUFS: re-armed when a buffer is back
    stats = dict.fromkeys(("enters", "cqes", "short_sends", "enobufs"), 0)
    lfd = lsock.fileno()

    def finish(fd: int) -> None:
        """Close fd once its recv has ended and nothing is left to send."""
        if fd not in open_fds and not queued[fd]:
            del queued[fd]
            socket.close(fd)

    ring.prep(uring.OP_ACCEPT, lfd, ACCEPT, ioprio=uring.ACCEPT_MULTISHOT)
    sq_tail = ring.sq_tail
    br_tail = bufs.tail
    enters = cqe_count = 0
    try:
        while True:
            ring.sq_tail = sq_tail & U32
            enter(1)
            enters += 1
            head, tail = u32[cq_head_i], u32[cq_tail_i]
            cqe_count += (tail - head) & U32
            recycled = False
            while head != tail:
                user_data, res, flags = cqe_at(rings, cqes + (head & cq_mask) * 16)
                head = (head + 1) & U32
                kind = user_data & 0xFF
                if kind == SEND:
                    fd = (user_data >> 8) & FD_MASK
                    bid = (user_data >> 32) & 0xFFFF
                    left = user_data >> 48
                    if 0 < res < left:  # short send: the rest from where it stopped
                        stats["short_sends"] += 1
                        off = offsets.get(bid, 0) + res
                        offsets[bid] = off
                        left -= res
                        user_data = SEND | fd << 8 | bid << 32 | left << 48
                        addr = base + bid * size + off
                        sqe_pack(sqes, (sq_tail & sq_mask) << 6, op_send, 0, 0, fd, 0, addr,
                                 left, 0, user_data, 0, 0, 0, 0, 0)  # fmt: skip
                        sq_tail += 1
                        continue
                    if offsets:
                        offsets.pop(bid, None)
                    buf_pack(br, (br_tail & br_mask) << 4, base + bid * size, size, bid)
                    br_tail += 1
                    recycled = True
                    q = queued[fd]
                    q.popleft()
                    if res < 0:  # the peer is gone: drop what is queued; recv ends by itself
                        while q:
                            b = q.popleft() & 0xFFFF
                            buf_pack(br, (br_tail & br_mask) << 4, base + b * size, size, b)
                            br_tail += 1
                        shutdown(fd)
                    elif q:
                        nxt = q[0]
                        b, n = nxt & 0xFFFF, nxt >> 16
                        sqe_pack(sqes, (sq_tail & sq_mask) << 6, op_send, 0, 0, fd, 0,
                                 base + b * size, n, 0, SEND | fd << 8 | nxt << 32,
                                 0, 0, 0, 0, 0)  # fmt: skip
                        sq_tail += 1
                        continue
                    if fd not in open_fds:
                        finish(fd)
                elif kind == RECV:
                    fd = user_data >> 8
                    if res > 0:
                        bid = flags >> 16
                        q = queued[fd]
                        if not q:  # else a send is in flight: this one waits its turn
                            sqe_pack(sqes, (sq_tail & sq_mask) << 6, op_send, 0, 0, fd, 0,
                                     base + bid * size, res, 0,
                                     SEND | fd << 8 | bid << 32 | res << 48,
                                     0, 0, 0, 0, 0)  # fmt: skip
                            sq_tail += 1
                        q.append(bid | res << 16)
                        if flags & f_more:
                            continue
                        ring.sq_tail = sq_tail & U32  # re-arm (the kernel ended it)
                        ring.prep(uring.OP_RECV, fd, RECV | fd << 8, ioprio=uring.RECV_MULTISHOT,
                                  sqe_flags=uring.IOSQE_BUFFER_SELECT, buf_group=BGID)  # fmt: skip
                        sq_tail = ring.sq_tail
                    elif res == -errno.ENOBUFS:
                        stats["enobufs"] += 1
                        starved.append(fd)
                    else:  # EOF or an error: the multishot recv has ended
                        if flags & f_buffer:
                            b = flags >> 16
                            buf_pack(br, (br_tail & br_mask) << 4, base + b * size, size, b)
                            br_tail += 1
                            recycled = True
                        if not flags & f_more:
                            open_fds.discard(fd)
                            finish(fd)
                elif kind == ACCEPT:
                    ring.sq_tail = sq_tail & U32
                    if res >= 0:
                        open_fds.add(res)
                        queued[res] = collections.deque()
                        ring.prep(uring.OP_RECV, res, RECV | res << 8, ioprio=uring.RECV_MULTISHOT,
                                  sqe_flags=uring.IOSQE_BUFFER_SELECT, buf_group=BGID)  # fmt: skip
                    if not flags & f_more:
                        ring.prep(uring.OP_ACCEPT, lfd, ACCEPT, ioprio=uring.ACCEPT_MULTISHOT)
                    sq_tail = ring.sq_tail
                if ((sq_tail - ring.submitted) & U32) >= sq_room:
                    u32[cq_head_i] = head
                    ring.sq_tail = sq_tail & U32
                    enter(0, 0)
            u32[cq_head_i] = head
            if recycled:
                br_tail &= 0xFFFF
                bufs.tail = br_tail
                bufs.publish()
                if starved:
                    ring.sq_tail = sq_tail & U32
                    while starved:
                        fd = starved.pop()
                        ring.prep(uring.OP_RECV, fd, RECV | fd << 8, ioprio=uring.RECV_MULTISHOT,
                                  sqe_flags=uring.IOSQE_BUFFER_SELECT, buf_group=BGID)  # fmt: skip
                    sq_tail = ring.sq_tail
    except Stop:
        pass
    stats["enters"], stats["cqes"] = enters, cqe_count
    ring.close()
    bufs.close()
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
