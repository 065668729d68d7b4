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
       [--sndbuf BYTES] [--once]
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import errno
import json
import signal
import socket
import sys
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ring as uring

# user_data: the kind in the low 2 bits, above it the fd (recv) or the buffer id (send).
# Kept below 2**30 so that CPython handles it as a one-digit int (no big-int arithmetic).
ACCEPT, RECV, SEND = 1, 2, 3
SYS_ENTER = uring.SYS_ENTER
U32, WRAP = 0xFFFFFFFF, 1 << 32
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


def serve(lsock: socket.socket, buffers: int, buffer_size: int, once: bool) -> dict[str, int]:
    """The loop. The hot path (recv and send completions) writes SQEs and buffer-ring
    entries inline, with everything it touches in local variables, and keeps the state of
    a buffer's send in lists indexed by buffer id."""
    ring = uring.Ring(max(64, 2 * buffers))
    bufs = uring.BufRing(ring, BGID, buffers, buffer_size)
    size, br, br_mask = bufs.size, bufs.ring_mem, bufs.mask
    addr_of = [bufs.base + bid * size for bid in range(buffers)]  # ints made once
    sqes, sq_mask, rings, cqes, cq_mask = (
        ring.sqes,
        ring.sq_mask,
        ring.rings,
        ring.cqes,
        ring.cq_mask,
    )
    u32, cq_head_i, cq_tail_i, sq_tail_i = ring.u32, ring.cq_head_i, ring.cq_tail_i, ring.sq_tail_i
    sqe_pack, buf_pack, cqe_at = uring.SQE.pack_into, uring.BUF.pack_into, uring.CQE.unpack_from
    sys_enter, ring_fd = uring.sys_enter, ring.fd
    getevents, get_errno = uring.ENTER_GETEVENTS, ctypes.get_errno
    op_send, f_more, f_buffer = uring.OP_SEND, uring.CQE_F_MORE, uring.CQE_F_BUFFER
    sq_room = ring.sq_entries - 8  # a turn flushes before the SQ fills
    send_fd = [0] * buffers  # per buffer id: the connection it echoes to,
    send_len = [0] * buffers  # the bytes left to send,
    send_off = [0] * buffers  # and the bytes already sent (only after a short send)
    queued: dict[int, collections.deque[int]] = {}  # fd -> its buffers, the first in flight
    open_fds: set[int] = set()  # connections whose multishot recv is armed
    starved: list[int] = []  # recv ended with ENOBUFS: re-armed when a buffer is back
    stats = dict.fromkeys(("enters", "cqes", "short_sends", "enobufs"), 0)
    lfd = lsock.fileno()

    def finish(fd: int) -> None:
        """Close fd once its recv has ended and nothing is left to send."""
        if fd not in open_fds and not queued[fd]:
            del queued[fd]
            socket.close(fd)
            if once and not queued:
                raise Stop

    def arm_recv(fd: int) -> None:
        ring.prep(uring.OP_RECV, fd, RECV | fd << 2, ioprio=uring.RECV_MULTISHOT,
                  sqe_flags=uring.IOSQE_BUFFER_SELECT, buf_group=BGID)  # fmt: skip

    ring.prep(uring.OP_ACCEPT, lfd, ACCEPT, ioprio=uring.ACCEPT_MULTISHOT)
    sq_tail, submitted = ring.sq_tail, ring.submitted
    br_tail = bufs.tail
    enters = cqe_count = 0
    try:
        while True:
            # io_uring_enter inline: publish the SQ tail, submit, wait for one completion.
            # Counters wrap at 2**32 by compare and subtract: `& 0xFFFFFFFF` would be
            # big-int arithmetic in CPython (the mask has two 30-bit digits).
            if sq_tail > U32:
                sq_tail -= WRAP
            u32[sq_tail_i] = sq_tail
            to_submit = sq_tail - submitted
            if to_submit < 0:
                to_submit += WRAP
            ret = sys_enter(SYS_ENTER, ring_fd, to_submit, 1, getevents, 0, 0)
            if ret > 0:
                submitted += ret
                if submitted > U32:
                    submitted -= WRAP
            elif ret < 0 and get_errno() not in (errno.EINTR, errno.EAGAIN, errno.EBUSY):
                raise OSError(get_errno(), "io_uring_enter")
            enters += 1
            head = u32[cq_head_i]
            n = u32[cq_tail_i] - head
            if n < 0:
                n += WRAP
            cqe_count += n
            recycled = False
            for i in range(head, head + n):
                user_data, res, flags = cqe_at(rings, cqes + ((i & cq_mask) << 4))
                kind = user_data & 3
                if kind == SEND:
                    bid = user_data >> 2
                    if 0 < res < send_len[bid]:  # short send: the rest from where it stopped
                        stats["short_sends"] += 1
                        send_off[bid] += res
                        send_len[bid] -= res
                        sqe_pack(sqes, (sq_tail & sq_mask) << 6, op_send, 0, 0, send_fd[bid],
                                 0, addr_of[bid] + send_off[bid], send_len[bid], 0, user_data,
                                 0, 0, 0, 0, 0)  # fmt: skip
                        sq_tail += 1
                        continue
                    buf_pack(br, (br_tail & br_mask) << 4, addr_of[bid], size, bid)
                    br_tail += 1
                    recycled = True
                    fd = send_fd[bid]
                    q = queued[fd]
                    q.popleft()
                    if res < 0:  # the peer is gone: drop what is queued; recv ends by itself
                        while q:
                            b = q.popleft()
                            buf_pack(br, (br_tail & br_mask) << 4, addr_of[b], size, b)
                            br_tail += 1
                        shutdown(fd)
                    elif q:
                        b = q[0]
                        sqe_pack(sqes, (sq_tail & sq_mask) << 6, op_send, 0, 0, fd, 0,
                                 addr_of[b], send_len[b], 0, SEND | b << 2,
                                 0, 0, 0, 0, 0)  # fmt: skip
                        sq_tail += 1
                        continue
                    if fd not in open_fds:
                        finish(fd)
                elif kind == RECV:
                    fd = user_data >> 2
                    if res > 0:
                        bid = flags >> 16
                        send_fd[bid] = fd
                        send_len[bid] = res
                        send_off[bid] = 0
                        q = queued[fd]
                        if not q:  # else a send is in flight: this one waits its turn
                            sqe_pack(sqes, (sq_tail & sq_mask) << 6, op_send, 0, 0, fd, 0,
                                     addr_of[bid], res, 0, SEND | bid << 2,
                                     0, 0, 0, 0, 0)  # fmt: skip
                            sq_tail += 1
                        q.append(bid)
                        if flags & f_more:
                            continue
                        ring.sq_tail = sq_tail & U32  # re-arm: the kernel ended it
                        arm_recv(fd)
                        sq_tail = ring.sq_tail
                    elif res == -errno.ENOBUFS:
                        stats["enobufs"] += 1
                        starved.append(fd)
                    else:  # EOF or an error: the multishot recv has ended
                        if flags & f_buffer:
                            b = flags >> 16
                            buf_pack(br, (br_tail & br_mask) << 4, addr_of[b], size, b)
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
                        arm_recv(res)
                    if not flags & f_more:
                        ring.prep(uring.OP_ACCEPT, lfd, ACCEPT, ioprio=uring.ACCEPT_MULTISHOT)
                    sq_tail = ring.sq_tail
                if not 0 <= sq_tail - submitted < sq_room:  # flush before the SQ is full
                    ring.sq_tail, ring.submitted = sq_tail & U32, submitted
                    ring.enter(0, 0)
                    submitted = ring.submitted
            head += n
            if head > U32:
                head -= WRAP
            u32[cq_head_i] = head
            if recycled:
                br_tail &= 0xFFFF
                bufs.tail = br_tail
                bufs.publish()
                if starved:
                    ring.sq_tail = sq_tail & U32
                    while starved:
                        arm_recv(starved.pop())
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
    parser.add_argument(
        "--sndbuf",
        type=int,
        default=0,
        help="SO_SNDBUF of the listener, inherited by accepted sockets (small: short sends)",
    )
    parser.add_argument(
        "--once",
        action="store_true",
        help="exit when the last connection has closed (valgrind does not deliver SIGTERM"
        " while io_uring_enter waits)",
    )
    args = parser.parse_args()
    features = uring.probe()
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if args.sndbuf:
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, args.sndbuf)
    lsock.bind(("127.0.0.1", args.port))
    lsock.listen(args.backlog)
    port = lsock.getsockname()[1]
    event = {"event": "listening", "address": f"127.0.0.1:{port}", "server": "uring-proto"}
    print(json.dumps({**event, "io_uring": features}), flush=True)
    stats = serve(lsock, args.buffers, args.buffer_size, args.once)
    print(json.dumps({"event": "stats", **stats}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
