"""The errors a user can cause; cli.main() turns each into one line and an exit code."""

from __future__ import annotations

import os


class EpolldError(Exception):
    """A mistake or condition the user can fix; never a bug in epolld."""

    exit_code = 1


class ConfigError(EpolldError):
    """The configuration file is missing, unreadable or invalid."""

    exit_code = os.EX_CONFIG  # 78: the unit's RestartPreventExitStatus


class BindError(EpolldError):
    """A listening address could not be bound (in use, not permitted, no such address)."""

    exit_code = os.EX_UNAVAILABLE  # 69

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno  # for systemd's ERRNO=


class DaemonError(EpolldError):
    """Classic daemon mode could not start (pidfile held, wrong environment)."""

    exit_code = os.EX_OSERR  # 71
