"""recvmmsg(2)/sendmmsg(2) through ctypes: a batch of datagrams in one system call each way.

Python 3.11's socket module has neither call. One MmsgBatch per UDP socket holds, allocated
once, what the kernel reads and writes: SLOTS struct mmsghdr, their iovecs, a sockaddr and
a control buffer per slot, and SLOTS data buffers of max_datagram bytes each. The endpoint
reads the results through memoryviews over those buffers (header words, source address
bytes, cmsg words) as small ints, so a datagram costs no Python object that can be avoided.

Layout (x86-64 and every other 64-bit Linux ABI: pointers and size_t are 8 bytes):
  struct msghdr  { void *name; socklen_t namelen; struct iovec *iov; size_t iovlen;
                   void *control; size_t controllen; int flags; }      56 bytes
  struct mmsghdr { struct msghdr hdr; unsigned int len; }               64 bytes
So, in 32-bit words of one mmsghdr: namelen 2, controllen 10 (low half), flags 12, len 14.

The data buffers are an anonymous mmap: the kernel gives pages only when a datagram is
written there, so 64 slots of 65,507 bytes cost a page or so each for small datagrams, not
4 MiB per socket.

Unavailable calls (a libc without the symbols, ENOSYS from an old kernel or EPERM/ENOSYS
from a seccomp filter such as systemd's SystemCallFilter=~recvmmsg) are found by probe():
both calls with zero messages, which the kernel answers with 0 without touching the queue.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import socket
import struct
from typing import Final

SLOTS: Final = 64  # datagrams per recvmmsg/sendmmsg call
HEADER_SIZE: Final = 64  # sizeof(struct mmsghdr)
IOVEC_SIZE: Final = 16  # sizeof(struct iovec)
CONTROL_SIZE: Final = 128  # bytes of control data per slot: room for pktinfo and a few more
W_NAMELEN: Final = 2  # 32-bit word offsets in one mmsghdr (see the layout above)
W_CONTROLLEN: Final = 10
W_FLAGS: Final = 12
W_LEN: Final = 14
Q_CONTROLLEN: Final = 5  # 64-bit word offset of msg_controllen
# errnos that say "this process may not use the call", not "this datagram failed".
UNAVAILABLE_ERRNOS: Final = frozenset({errno.ENOSYS, errno.EPERM, errno.EACCES})

_DONTWAIT: Final = int(socket.MSG_DONTWAIT)  # a plain int for ctypes, not an IntFlag
_calls: tuple[ctypes._CFuncPtr, ctypes._CFuncPtr] | None = None  # type: ignore[name-defined]
_calls_error = ""


def _libc_calls() -> tuple[ctypes._CFuncPtr, ctypes._CFuncPtr]:  # type: ignore[name-defined]
    """recvmmsg and sendmmsg from the C library, typed once.

    Raises:
        OSError: the C library lacks one of them (ENOSYS).
    """
    global _calls, _calls_error
    if _calls is None:
        if _calls_error:
            raise OSError(errno.ENOSYS, _calls_error)
        if struct.calcsize("P") != 8:  # the offsets above are the 64-bit ABI's
            _calls_error = "recvmmsg/sendmmsg layout is only known for 64-bit Linux"
            raise OSError(errno.ENOSYS, _calls_error)
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            recv, send = libc.recvmmsg, libc.sendmmsg
        except (OSError, AttributeError) as e:
            _calls_error = f"no recvmmsg/sendmmsg in the C library: {e}"
            raise OSError(errno.ENOSYS, _calls_error) from None
        # No argtypes: converting each argument through them costs more than the call
        # itself. The callers pass what needs no conversion: small ints (int), c_void_p
        # objects made once for the addresses, None (NULL); the result is an int.
        recv.restype = send.restype = ctypes.c_int
        _calls = (recv, send)
    return _calls


def probe(sock: socket.socket) -> None:
    """Check that this process may call recvmmsg and sendmmsg on sock.

    Zero messages: the kernel returns 0 without reading or sending anything, while a
    seccomp filter refuses the call whatever its arguments.

    Raises:
        OSError: the calls are unavailable (no symbol, ENOSYS, EPERM...).
    """
    recv, send = _libc_calls()
    fd = sock.fileno()
    if recv(fd, None, 0, 0, None) < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"recvmmsg: {errno.errorcode.get(code, code)}")
    if send(fd, None, 0, 0) < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"sendmmsg: {errno.errorcode.get(code, code)}")


class MmsgBatch:
    """The preallocated message headers and buffers of one UDP socket.

    Args:
        sock: the UDP socket (AF_INET or AF_INET6).
        size: bytes per data buffer (max_datagram): a longer datagram is flagged MSG_TRUNC.
        control: whether to receive control data (IP_PKTINFO on a wildcard socket).

    After recv() returns n, slot i (i < n) holds: words[16*i + W_LEN] the length,
    words[16*i + W_FLAGS] the flags, names[stride*i:...] the source sockaddr,
    controls[CONTROL_SIZE*i:...] the control data. To reply, the endpoint sets the
    slot's iov length (iov_lens[2*i + 1]), moves the replies' headers to the front
    (64-byte slices of raw), and calls send(start, count); recv() restores the headers.
    """

    def __init__(self, sock: socket.socket, size: int, *, control: bool) -> None:
        self._recv, self._send = _libc_calls()
        self.fd = sock.fileno()
        self.size = size
        self.slots = SLOTS
        self.control_size = CONTROL_SIZE
        self.name_size = 28 if sock.family == socket.AF_INET6 else 16  # sockaddr_in6 / _in
        meta_size = SLOTS * (HEADER_SIZE + IOVEC_SIZE + self.name_size + CONTROL_SIZE)
        self._meta = (ctypes.c_char * meta_size)()
        self._data = mmap.mmap(-1, max(1, SLOTS * size))  # anonymous: pages on first write
        self._data_ref = ctypes.c_char.from_buffer(self._data)  # keeps the address valid
        base = ctypes.addressof(self._meta)
        iovs = base + SLOTS * HEADER_SIZE
        names = iovs + SLOTS * IOVEC_SIZE
        controls = names + SLOTS * self.name_size
        data = ctypes.addressof(self._data_ref)
        self._headers = ctypes.c_void_p(base)  # recvmmsg's vector
        self._from_slot = [ctypes.c_void_p(base + i * HEADER_SIZE) for i in range(SLOTS)]
        for i in range(SLOTS):
            struct.pack_into("PQ", self._meta, SLOTS * HEADER_SIZE + i * IOVEC_SIZE,
                             data + i * size, size)  # fmt: skip
            struct.pack_into(
                "PI4xPQPQi4xI4x", self._meta, i * HEADER_SIZE,
                names + i * self.name_size, self.name_size, iovs + i * IOVEC_SIZE, 1,
                controls + i * CONTROL_SIZE if control else 0, CONTROL_SIZE if control else 0,
                0, 0,
            )  # fmt: skip
        raw = memoryview(self._meta).cast("B")
        self._restore_end = SLOTS * (HEADER_SIZE + IOVEC_SIZE)
        self._template = bytes(raw[: self._restore_end])  # headers and iovecs as recv wants
        self.raw = raw
        self.words = raw[: SLOTS * HEADER_SIZE].cast("I")
        self.quads = raw[: SLOTS * HEADER_SIZE].cast("Q")
        self.iov_lens = raw[SLOTS * HEADER_SIZE : self._restore_end].cast("Q")
        self.iov_words = raw[SLOTS * HEADER_SIZE : self._restore_end].cast("I")
        names_end = self._restore_end + SLOTS * self.name_size
        self.names = raw[self._restore_end : names_end]
        self.name_words = self.names.cast("I")
        self.port_halves = self.names.cast("H")  # sin_port is half 1 of each sockaddr
        self.controls = raw[names_end:]
        self.control_words = self.controls.cast("I")
        self.data = memoryview(self._data)
        self._dirty = False

    def recv(self) -> int:
        """Receive up to SLOTS datagrams without waiting.

        Returns:
            The number received; 0 when none is queued.

        Raises:
            OSError: the first datagram's error (an ICMP error, or a refused call).
        """
        if self._dirty:  # the last reply changed lengths and moved headers
            self.raw[: self._restore_end] = self._template
        n: int = self._recv(self.fd, self._headers, SLOTS, _DONTWAIT, None)
        self._dirty = n > 0
        if n < 0:
            code = ctypes.get_errno()
            if code in (errno.EAGAIN, errno.EWOULDBLOCK):
                return 0
            raise OSError(code, errno.errorcode.get(code, str(code)))
        return n

    def send(self, start: int, count: int) -> int:
        """Send the replies in header slots start..count-1 without waiting.

        Returns:
            How many were sent from start on (fewer than asked: the next one failed).

        Raises:
            OSError: the first one failed (EAGAIN when the send buffer is full).
        """
        sent: int = self._send(self.fd, self._from_slot[start], count - start, _DONTWAIT)
        if sent < 0:
            code = ctypes.get_errno()
            raise OSError(code, errno.errorcode.get(code, str(code)))
        return sent

    def close(self) -> None:
        """Release the data buffers (the memoryviews over them first)."""
        for view in (self.data, self.words, self.quads, self.iov_lens, self.iov_words,
                     self.names, self.name_words, self.port_halves, self.controls,
                     self.control_words, self.raw):  # fmt: skip
            view.release()
        del self._data_ref
        self._data.close()
