"""RFC 864's character generator pattern, without sockets.

The 95 printable ASCII characters (space to "~") form a ring; each line is 72 of them
followed by CR LF, and each line starts one character further on the ring. As in the
RFC's example, the first line starts with "!" (ring position 1). The pattern repeats
every 95 lines (CYCLE_BYTES), so where a stream is in it is its byte count modulo
CYCLE_BYTES: a chargen connection that moves to another process (restart handoff)
resumes from its count alone.
"""

from __future__ import annotations

from typing import Final

RING: Final = bytes(range(32, 127))  # the 95 printable ASCII characters
LINE_CHARS: Final = 72
FIRST: Final = 1  # the RFC's example begins at "!"
LINE_BYTES: Final = LINE_CHARS + 2  # CR LF
CYCLE_BYTES: Final = len(RING) * LINE_BYTES  # 7030


def line(n: int) -> bytes:
    """Line n (from 0) of the pattern, CR LF included."""
    start = (FIRST + n) % len(RING)
    ring2 = RING + RING
    return ring2[start : start + LINE_CHARS] + b"\r\n"


CYCLE: Final = b"".join(line(n) for n in range(len(RING)))


def window(chunk: int) -> memoryview:
    """Enough repetitions of the pattern that any `chunk` bytes from any offset within
    one cycle are one slice (no copy per send)."""
    return memoryview(CYCLE * (chunk // CYCLE_BYTES + 2))


def expected(offset: int, size: int) -> bytes:
    """The size bytes of the pattern that start at stream offset (for checks and tests)."""
    start = offset % CYCLE_BYTES
    return bytes(window(size)[start : start + size])
