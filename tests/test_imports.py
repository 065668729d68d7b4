"""What the daemon loads at start-up: structlog without asyncio, which costs 10 MiB."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
import epolld.cli
loaded = sorted(m for m in ("asyncio", "ssl") if m in sys.modules)
import structlog._log_levels
# The stand-in still resolves: structlog's async methods would get the real asyncio.
assert structlog._log_levels.asyncio.get_running_loop.__module__ in ("asyncio.events", "_asyncio")
print(",".join(loaded) or "none")
"""


def test_daemon_imports_without_asyncio() -> None:
    """Importing the CLI loads neither asyncio nor ssl, yet asyncio stays reachable."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=30, check=True
    )
    assert out.stdout.strip() == "none"
