"""Let a test answer some system calls of a process, call by call: a seccomp filter whose
action is SECCOMP_RET_USER_NOTIF (seccomp_unotify(2), Linux 5.5 for "go on").

    python -m tests.seccomp_notify --calls accept4,epoll_wait --send-to FD -- CMD ARGS...

installs the filter, sends its notification descriptor over the Unix socket FD
(SCM_RIGHTS) and execs CMD, which keeps the filter. The test holds the other end
(`Supervisor`) and decides each call: an errno the kernel returns without running it, or
go on (SECCOMP_USER_NOTIF_FLAG_CONTINUE). Real errors at real moments, which a kernel
seldom gives on its own (ECONNABORTED from accept(), say). Standard library only.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import fcntl
import os
import platform
import select
import socket
import struct
import sys
import threading
from collections.abc import Callable

from tests.seccomp_exec import ARCHES, SockFprog, libc_without_new_privs, program

# {machine: (seccomp(2)'s number, {name: number})}: asm/unistd*.h.
SYSCALLS = {
    "x86_64": (317, {"accept4": 288, "epoll_wait": 232, "epoll_pwait": 281}),
    "aarch64": (277, {"accept4": 242, "epoll_pwait": 22}),
}
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
SECCOMP_RET_USER_NOTIF = 0x7FC00000
SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1
# struct seccomp_notif: id, pid, flags, then seccomp_data (nr, arch, ip, args[6]).
NOTIF = struct.Struct("QIIiIQ6Q")
# struct seccomp_notif_resp: id, val, error, flags.
NOTIF_RESP = struct.Struct("QqiI")
IOCTL_NOTIF_RECV = 0xC0000000 | NOTIF.size << 16 | ord("!") << 8 | 0  # _IOWR('!', 0, ...)
IOCTL_NOTIF_SEND = 0xC0000000 | NOTIF_RESP.size << 16 | ord("!") << 8 | 1

Decide = Callable[[str, tuple[int, ...]], int | None]  # (call, args) -> errno, or None: go on


def names() -> dict[int, str]:
    """System call numbers to the names this helper knows, on this machine."""
    return {number: name for name, number in SYSCALLS[platform.machine()][1].items()}


class Supervisor:
    """The test's end: answers every call the filter reports, in a thread of its own.

    Args:
        notify_fd: the filter's notification descriptor (received from the helper).
        decide: called for each call with its name and arguments; returns the errno to
            fail it with, or None to let it run.
    """

    def __init__(self, notify_fd: int, decide: Decide) -> None:
        self._fd = notify_fd
        self._decide = decide
        self._names = names()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop answering; calls still trapped after this fail with ENOSYS (the kernel's)."""
        self._stopping.set()
        self._thread.join(5.0)
        os.close(self._fd)

    def _serve(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        while not self._stopping.is_set():
            events = poller.poll(100)
            if any(ev & select.POLLHUP for _, ev in events):
                return  # every filtered process is gone
            if events:
                self._answer_one()

    def _answer_one(self) -> None:
        buffer = bytearray(NOTIF.size)  # the kernel wants it zeroed
        try:
            fcntl.ioctl(self._fd, IOCTL_NOTIF_RECV, buffer)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.EINTR):
                return  # the caller was interrupted or died meanwhile
            raise
        notif_id, _pid, _flags, nr, _arch, _ip, *args = NOTIF.unpack(buffer)
        code = self._decide(self._names.get(nr, str(nr)), tuple(args))
        if code is None:
            resp = NOTIF_RESP.pack(notif_id, 0, 0, SECCOMP_USER_NOTIF_FLAG_CONTINUE)
        else:
            resp = NOTIF_RESP.pack(notif_id, 0, -code, 0)
        try:
            fcntl.ioctl(self._fd, IOCTL_NOTIF_SEND, resp)
        except OSError as e:
            if e.errno != errno.ENOENT:  # ENOENT: the caller is gone
                raise


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", required=True, help="system call names, comma-separated")
    parser.add_argument("--send-to", type=int, required=True, help="a Unix socket's fd")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    machine = platform.machine()
    seccomp_nr, table = SYSCALLS[machine]
    numbers = [table[name] for name in args.calls.split(",")]
    raw = program(ARCHES[machine][0], numbers, SECCOMP_RET_USER_NOTIF)
    buffer = ctypes.create_string_buffer(raw, len(raw))
    fprog = SockFprog(len(raw) // 8, ctypes.addressof(buffer))
    libc = libc_without_new_privs()
    libc.syscall.restype = ctypes.c_long
    notify_fd = libc.syscall(
        ctypes.c_long(seccomp_nr),
        ctypes.c_uint(SECCOMP_SET_MODE_FILTER),
        ctypes.c_uint(SECCOMP_FILTER_FLAG_NEW_LISTENER),
        ctypes.byref(fprog),
    )
    if notify_fd < 0:
        raise OSError(ctypes.get_errno(), "seccomp(SECCOMP_FILTER_FLAG_NEW_LISTENER)")
    with socket.socket(fileno=args.send_to) as channel:
        socket.send_fds(channel, [b"fd"], [notify_fd])
    os.close(notify_fd)
    sys.stdout.flush()
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
