"""A minimal io_uring in the standard library: the three system calls through ctypes, the
rings mapped with mmap, entries written with struct.pack_into (issue 25, step 1).

Only what Debian 12's kernel (6.1) offers is used; FEATURES names each piece with the kernel
version it appeared in (from the io_uring_setup(2), io_uring_enter(2), io_uring_register(2)
and io_uring_prep_*(3) man pages of liburing), and probe() checks each one on the running
kernel. The constants are the kernel's UAPI (include/uapi/linux/io_uring.h).

With IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN the kernel posts completions
and consumes provided buffers only inside our own io_uring_enter(GETEVENTS), so plain loads
and stores on the mapped rings are enough (x86-64 keeps stores in order; the kernel reads
the tails with acquire semantics).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import socket
import struct

# System call numbers: the same on every architecture (the generic table, since 5.1).
SYS_SETUP, SYS_ENTER, SYS_REGISTER = 425, 426, 427

SETUP_SINGLE_ISSUER = 1 << 12  # 6.0
SETUP_DEFER_TASKRUN = 1 << 13  # 6.1, needs SINGLE_ISSUER
SETUP_FLAGS = SETUP_SINGLE_ISSUER | SETUP_DEFER_TASKRUN

FEAT_SINGLE_MMAP = 1 << 0  # 5.4: SQ and CQ rings share one mapping
FEAT_NODROP = 1 << 1  # 5.5: the kernel keeps overflowing completions
FEAT_FAST_POLL = 1 << 5  # 5.7: a socket op that would block is retried on poll, not a thread

ENTER_GETEVENTS = 1 << 0

OP_ACCEPT, OP_SEND, OP_RECV = 13, 26, 27  # 5.5, 5.6, 5.6
IOSQE_BUFFER_SELECT = 1 << 5  # 5.7: the kernel picks a buffer of buf_group
RECV_MULTISHOT = 1 << 1  # 6.0, in sqe->ioprio of OP_RECV
ACCEPT_MULTISHOT = 1 << 0  # 5.19, in sqe->ioprio of OP_ACCEPT

CQE_F_BUFFER = 1 << 0  # the upper 16 bits of cqe->flags are the buffer id
CQE_F_MORE = 1 << 1  # the multishot request stays armed
CQE_BUFFER_SHIFT = 16

REGISTER_PROBE = 8  # 5.6
REGISTER_PBUF_RING = 22  # 5.19
PROBE_OPS = 256
OP_SUPPORTED = 1

OFF_SQ_RING, OFF_CQ_RING, OFF_SQES = 0, 0x8000000, 0x10000000

# What the prototype uses, and the kernel release that introduced it: all within 6.1.
# IORING_SETUP_NO_SQARRAY (6.6) is not among them: the SQ index array is filled once.
FEATURES: dict[str, tuple[int, int]] = {
    "io_uring_setup/enter/register": (5, 1),
    "IORING_FEAT_SINGLE_MMAP": (5, 4),
    "IORING_FEAT_NODROP": (5, 5),
    "IORING_OP_ACCEPT": (5, 5),
    "IORING_OP_SEND": (5, 6),
    "IORING_OP_RECV": (5, 6),
    "IORING_REGISTER_PROBE": (5, 6),
    "IORING_FEAT_FAST_POLL": (5, 7),
    "IOSQE_BUFFER_SELECT": (5, 7),
    "IORING_ACCEPT_MULTISHOT": (5, 19),
    "IORING_REGISTER_PBUF_RING": (5, 19),
    "IORING_RECV_MULTISHOT": (6, 0),
    "IORING_SETUP_SINGLE_ISSUER": (6, 0),
    "IORING_SETUP_DEFER_TASKRUN": (6, 1),
}

# struct io_uring_params: 10 u32 fields, then io_sqring_offsets and io_cqring_offsets.
PARAMS = struct.Struct("<10I" + "8IQ" + "8IQ")
# struct io_uring_sqe (64 bytes) as this prototype fills it: opcode, flags, ioprio, fd, off,
# addr, len, msg/accept flags, user_data, buf_group, personality, file_index, addr3, pad.
SQE = struct.Struct("<BBHiQQIIQHHiQQ")
CQE = struct.Struct("<QiI")  # user_data, res, flags
BUF = struct.Struct("<QIH")  # struct io_uring_buf without resv (bufs[0].resv is the tail)
BUF_REG = struct.Struct("<QIHH5Q")  # struct io_uring_buf_reg: 40 bytes

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall  # with pointers: every argument converted as a long
_syscall.restype = ctypes.c_long
_syscall.argtypes = [ctypes.c_long] * 7
# The same function for io_uring_enter, whose arguments all fit a C int: without argtypes
# ctypes passes Python ints as int (libffi widens them to the 64-bit register), which costs
# half the time per call of the converted one (0.76 against 1.74 us, timeit, this machine).
sys_enter = _libc["syscall"]
sys_enter.restype = ctypes.c_long


def _check(ret: int) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def address(buf: mmap.mmap | bytearray) -> int:
    """The address of a writable buffer's first byte."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


class Ring:
    """One io_uring instance: SQEs are written at sq_tail, published by enter()."""

    def __init__(self, entries: int = 4096, flags: int = SETUP_FLAGS) -> None:
        params = bytearray(PARAMS.size)
        PARAMS.pack_into(params, 0, 0, 0, flags, *([0] * 25))
        self.fd = _check(_syscall(SYS_SETUP, entries, address(params), 0, 0, 0, 0))
        p = PARAMS.unpack_from(params)
        self.sq_entries, self.cq_entries, self.flags, self.features = p[0], p[1], p[2], p[5]
        sq_head, sq_tail, sq_mask, _, _, _, sq_array, _, _ = p[10:19]
        cq_head, cq_tail, cq_mask, _, _, cqes, _, _, _ = p[19:28]
        if not self.features & FEAT_SINGLE_MMAP:
            raise OSError(errno.ENOSYS, "io_uring without IORING_FEAT_SINGLE_MMAP (< 5.4)")
        size = max(sq_array + 4 * self.sq_entries, cqes + CQE.size * self.cq_entries)
        prot, share = mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | mmap.MAP_POPULATE
        self.rings = mmap.mmap(self.fd, size, share, prot, offset=OFF_SQ_RING)
        self.sqes = mmap.mmap(self.fd, SQE.size * self.sq_entries, share, prot, offset=OFF_SQES)
        self.u32 = memoryview(self.rings).cast("I")  # heads, tails, masks by offset // 4
        self.sq_head_i, self.sq_tail_i = sq_head // 4, sq_tail // 4
        self.cq_head_i, self.cq_tail_i = cq_head // 4, cq_tail // 4
        self.sq_mask, self.cq_mask = self.u32[sq_mask // 4], self.u32[cq_mask // 4]
        self.cqes = cqes
        for i in range(self.sq_entries):  # SQ slot i always holds SQE i
            self.u32[sq_array // 4 + i] = i
        self.sq_tail = self.u32[self.sq_tail_i]  # ours: the kernel only reads it
        self.submitted = self.sq_tail  # SQEs the kernel has consumed (returns of enter)

    def pending(self) -> int:
        """SQEs written since the last enter()."""
        return (self.sq_tail - self.submitted) & 0xFFFFFFFF

    def prep(
        self,
        op: int,
        fd: int,
        user_data: int,
        addr: int = 0,
        length: int = 0,
        ioprio: int = 0,
        sqe_flags: int = 0,
        buf_group: int = 0,
    ) -> None:
        """Write one SQE (the caller keeps pending() below sq_entries)."""
        off = (self.sq_tail & self.sq_mask) * 64
        SQE.pack_into(
            self.sqes, off, op, sqe_flags, ioprio, fd, 0, addr, length, 0, user_data, buf_group,
            0, 0, 0, 0,
        )  # fmt: skip
        self.sq_tail = (self.sq_tail + 1) & 0xFFFFFFFF

    def enter(self, min_complete: int, flags: int = ENTER_GETEVENTS) -> int:
        """Publish the SQ tail, submit what is pending and wait for min_complete CQEs."""
        to_submit = self.pending()
        self.u32[self.sq_tail_i] = self.sq_tail
        ret = sys_enter(SYS_ENTER, self.fd, to_submit, min_complete, flags, 0, 0)
        if ret < 0:
            err = ctypes.get_errno()
            if err in (errno.EINTR, errno.EAGAIN, errno.EBUSY):
                return 0  # the SQEs stay pending for the next enter
            raise OSError(err, os.strerror(err))
        self.submitted = (self.submitted + ret) & 0xFFFFFFFF
        return int(ret)

    def register(self, opcode: int, arg: int, nr_args: int) -> int:
        return _check(_syscall(SYS_REGISTER, self.fd, opcode, arg, nr_args, 0, 0, 0))

    def supported_ops(self) -> set[int]:
        """The opcodes the kernel supports (IORING_REGISTER_PROBE)."""
        buf = bytearray(16 + 8 * PROBE_OPS)
        self.register(REGISTER_PROBE, address(buf), PROBE_OPS)
        ops_len = buf[1]
        return {buf[16 + 8 * i] for i in range(ops_len) if buf[16 + 8 * i + 2] & OP_SUPPORTED}

    def close(self) -> None:
        self.u32.release()
        self.rings.close()
        self.sqes.close()
        os.close(self.fd)


class BufRing:
    """A provided-buffer ring (IORING_REGISTER_PBUF_RING): count buffers of size bytes in
    one anonymous mapping, handed to the kernel by writing entries and the ring's tail."""

    def __init__(self, ring: Ring, bgid: int, count: int, size: int) -> None:
        self.bgid, self.count, self.size, self.mask = bgid, count, size, count - 1
        self.ring_mem = mmap.mmap(-1, 16 * count)  # page-aligned, as the kernel requires
        self.data = mmap.mmap(-1, count * size)
        self.base = address(self.data)
        reg = bytearray(BUF_REG.size)
        BUF_REG.pack_into(reg, 0, address(self.ring_mem), count, bgid, 0, 0, 0, 0, 0, 0)
        ring.register(REGISTER_PBUF_RING, address(reg), 1)
        self.tail = 0
        for bid in range(count):
            self.put(bid)
        self.publish()

    def put(self, bid: int) -> None:
        """Give buffer bid back (seen by the kernel after publish())."""
        BUF.pack_into(self.ring_mem, (self.tail & self.mask) * 16, self.base + bid * self.size,
                      self.size, bid)  # fmt: skip
        self.tail = (self.tail + 1) & 0xFFFF

    def publish(self) -> None:
        struct.pack_into("<H", self.ring_mem, 14, self.tail)

    def close(self) -> None:
        self.ring_mem.close()
        self.data.close()


def probe() -> dict[str, object]:
    """Check every feature the prototype uses on the running kernel; raise OSError with the
    reason if one is missing (EPERM/ENOSYS from io_uring_setup propagate as they are)."""
    ring = Ring(8)
    try:
        missing = [
            name
            for bit, name in (
                (FEAT_SINGLE_MMAP, "IORING_FEAT_SINGLE_MMAP"),
                (FEAT_NODROP, "IORING_FEAT_NODROP"),
                (FEAT_FAST_POLL, "IORING_FEAT_FAST_POLL"),
            )
            if not ring.features & bit
        ]
        ops = ring.supported_ops()
        missing += [
            name
            for op, name in ((OP_ACCEPT, "IORING_OP_ACCEPT"), (OP_SEND, "IORING_OP_SEND"),
                             (OP_RECV, "IORING_OP_RECV"))
            if op not in ops
        ]  # fmt: skip
        if missing:
            raise OSError(errno.ENOSYS, "io_uring lacks " + ", ".join(missing))
        bufs = BufRing(ring, 0, 2, 64)  # EINVAL before 5.19
        a, b = socket.socketpair()
        try:
            a.send(b"x")
            ring.prep(OP_RECV, b.fileno(), 1, ioprio=RECV_MULTISHOT,
                      sqe_flags=IOSQE_BUFFER_SELECT, buf_group=0)  # fmt: skip
            ring.enter(1)
            head = ring.u32[ring.cq_head_i]
            user_data, res, flags = CQE.unpack_from(
                ring.rings, ring.cqes + (head & ring.cq_mask) * 16
            )
            ring.u32[ring.cq_head_i] = head + 1
            if user_data != 1 or res != 1 or not flags & CQE_F_MORE:
                raise OSError(-res if res < 0 else errno.ENOSYS, "no multishot recv (< 6.0)")
        finally:
            a.close()
            b.close()
            bufs.close()
    finally:
        ring.close()
    return {
        "kernel": os.uname().release,
        "setup_flags": "IORING_SETUP_SINGLE_ISSUER|IORING_SETUP_DEFER_TASKRUN",
        "uses": {name: f"{v[0]}.{v[1]}" for name, v in FEATURES.items()},
    }
