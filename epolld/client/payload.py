"""The bytes --check sends: messages cut from a seeded random pool, reproducible by seed."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator

POOL_SIZE = 1024 * 1024  # bytes of seeded random data that --check messages are cut from
BLOCK_SIZE = 64 * 1024  # bytes of a message taken from one random offset in the pool


def random_pool(seed: int) -> memoryview:
    """Return POOL_SIZE seeded random bytes, twice over so a slice may wrap around."""
    pool = random.Random(seed).randbytes(POOL_SIZE)
    return memoryview(pool + pool)


def random_messages(
    pool: memoryview, seed: int, connection: int, count: int | None, size: tuple[int, int]
) -> Iterator[bytes]:
    """Yield count random messages; the same seed and connection give the same bytes.

    random.randbytes() makes only about 200 MB/s here, slower than the servers
    under test, so messages are cut from the random pool instead: each block of
    BLOCK_SIZE bytes starts at its own random offset. A dropped, repeated or
    reordered block therefore still shows up as a mismatch.

    Args:
        pool: random_pool(seed).
        seed: the --seed value.
        connection: 1-based connection number; each connection gets its own messages.
        count: messages to yield; None: without end (--duration stops them).
        size: (min, max) bytes per message, inclusive.
    """
    rng = random.Random(f"{seed}/{connection}")
    for _ in itertools.count() if count is None else range(count):
        length = rng.randint(*size)
        blocks = []
        for start in range(0, length, BLOCK_SIZE):
            offset = rng.randrange(POOL_SIZE)
            blocks.append(pool[offset : offset + min(BLOCK_SIZE, length - start)])
        yield b"".join(blocks)
