"""sd_notify through sdnotify: readiness, reload/stop states, STATUS, watchdog.

Stub: the systemd issue implements this. The contract the loop and cli rely on:
every method is a silent no-op outside systemd (NOTIFY_SOCKET unset) and never raises.
"""

from __future__ import annotations

import os
from collections.abc import Mapping


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = os.environ if environ is None else environ

    @property
    def enabled(self) -> bool:
        return bool(self._environ.get("NOTIFY_SOCKET"))

    def ready(self, status: str) -> None:
        """READY=1 with STATUS=status: every listener is bound, the loop is about to run."""

    def reloading(self) -> None:
        """RELOADING=1 with MONOTONIC_USEC, at the start of a SIGHUP reload."""

    def stopping(self, status: str) -> None:
        """STOPPING=1 with STATUS=status, at the start of a graceful stop."""

    def status(self, text: str) -> None:
        """STATUS=text."""

    def extend_timeout(self, seconds: float) -> None:
        """EXTEND_TIMEOUT_USEC: a drain needs this much longer than systemd's stop timeout."""

    def fatal(self, status: str, errno: int | None = None) -> None:
        """STATUS= (and ERRNO=) before exiting on a start-up error."""

    def watchdog_interval_s(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None when not asked."""
        return None

    def watchdog_ping(self) -> None:
        """WATCHDOG=1."""
