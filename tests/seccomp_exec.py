"""Run a command under a seccomp filter that refuses some system calls with an errno.

    python tests/seccomp_exec.py --deny recvmmsg,sendmmsg --errno EPERM -- CMD ARGS...

The kernel then answers those calls with -1 and that errno, in this process and all it
execs (as systemd's SystemCallFilter=~recvmmsg with SystemCallErrorNumber=EPERM would):
the tests use it to take recvmmsg/sendmmsg away from the daemon for real. Standard
library only: the BPF program is packed by hand and installed with prctl(2).
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import os
import platform
import struct
import sys

# (AUDIT_ARCH_*, {name: syscall number}) per machine: linux/audit.h, asm/unistd*.h.
ARCHES = {
    "x86_64": (0xC000003E, {"recvmmsg": 299, "sendmmsg": 307}),
    "aarch64": (0xC00000B7, {"recvmmsg": 243, "sendmmsg": 269}),
}
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
BPF_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
BPF_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
BPF_RET_K = 0x06  # BPF_RET | BPF_K


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def program(arch: int, numbers: list[int], action: int) -> bytes:
    """seccomp_data: nr at offset 0, arch at 4. The calls named get action (an errno, a
    notification: seccomp_notify.py); other calls and architectures pass untouched."""
    n = len(numbers)
    insns = [(BPF_LD_W_ABS, 0, 0, 4), (BPF_JEQ_K, 0, n + 1, arch), (BPF_LD_W_ABS, 0, 0, 0)]
    for i, number in enumerate(numbers):  # a match jumps to the last instruction: deny
        insns.append((BPF_JEQ_K, n - i, 0, number))
    insns += [(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW), (BPF_RET_K, 0, 0, action)]
    return b"".join(struct.pack("HBBI", *insn) for insn in insns)


def libc_without_new_privs() -> ctypes.CDLL:
    """libc, once prctl(PR_SET_NO_NEW_PRIVS) is set: what installing a filter requires
    (without CAP_SYS_ADMIN), and no exec'd program can gain privileges past it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong,
                           ctypes.c_ulong]  # fmt: skip
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, None, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    return libc


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--deny", required=True, help="system call names, comma-separated")
    parser.add_argument("--errno", default="EPERM", help="the errno they fail with")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    arch, table = ARCHES[platform.machine()]
    code = getattr(errno, args.errno)
    raw = program(arch, [table[name] for name in args.deny.split(",")], SECCOMP_RET_ERRNO | code)
    buffer = ctypes.create_string_buffer(raw, len(raw))
    fprog = SockFprog(len(raw) // 8, ctypes.addressof(buffer))
    libc = libc_without_new_privs()
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")
    sys.stdout.flush()
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
