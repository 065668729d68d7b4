"""Closing a TCP connection with an RST, and the send queue that decides when to.

Both the idle close (service/drain.py) and the reset_after_bytes fault (faults/) look at
the bytes the peer has not acknowledged (SIOCOUTQ) and make close() send an RST
(SO_LINGER on with 0 s).
"""

from __future__ import annotations

import fcntl
import socket
import struct
import termios
from typing import Final

SIOCOUTQ: Final = termios.TIOCOUTQ  # the same ioctl number for sockets (tcp(7), unix(7))
_LINGER_RESET: Final = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s


def unacked_bytes(fd: int) -> int:
    """Bytes sent and not yet acknowledged by the peer (SIOCOUTQ); 0 if it cannot say."""
    try:
        return int(struct.unpack("i", fcntl.ioctl(fd, SIOCOUTQ, b"\0\0\0\0"))[0])
    except OSError:
        return 0


def reset_on_close(sock: socket.socket) -> None:
    """Make sock's close() send an RST and drop its send queue.

    Raises:
        OSError: the socket refused the option.
    """
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
