"""RFC 864's pattern (services/pattern.py), without sockets."""

from __future__ import annotations

from epolld.services import pattern


def test_lines_rotate_by_one_printable_character() -> None:
    """Each line is 72 printable characters and CR LF, one further on the ring than the
    one before; the first starts with "!", as RFC 864's example does."""
    printable = bytes(range(32, 127))
    assert pattern.line(0).startswith(b'!"#$%&')
    for n in range(200):
        text = pattern.line(n)
        assert len(text) == 74
        assert text.endswith(b"\r\n")
        assert all(c in printable for c in text[:72])
        assert pattern.line(n + 1)[:71] == text[1:72]


def test_the_pattern_repeats_every_95_lines() -> None:
    """95 lines make one cycle, and a stream's offset alone says where it is."""
    assert pattern.CYCLE_BYTES == 95 * 74
    assert pattern.line(95) == pattern.line(0)
    stream = pattern.expected(0, 3 * pattern.CYCLE_BYTES + 100)
    for offset in (0, 1, 73, 74, pattern.CYCLE_BYTES - 1, pattern.CYCLE_BYTES + 5, 12_345):
        assert pattern.expected(offset, 100) == stream[offset : offset + 100]


def test_window_serves_any_chunk_from_any_offset() -> None:
    """The shared window holds a whole chunk from every offset within a cycle."""
    window = pattern.window(65536)
    assert len(window) >= pattern.CYCLE_BYTES + 65536
