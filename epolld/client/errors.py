"""epolld-client's exit codes, what each means, and the errors that carry them.

sysexits(3) names, as epolld's own errors use, so that monitoring can tell "the
server is down" from "the server is wrong". --json reports the meaning with the code.
"""

from __future__ import annotations

import os

EXIT_OK = 0
EXIT_USAGE = 2  # argparse's own code
EXIT_MISMATCH = os.EX_DATAERR  # 65
EXIT_RESOLVE = os.EX_NOHOST  # 68
EXIT_REFUSED = os.EX_UNAVAILABLE  # 69
EXIT_SOCKET = os.EX_OSERR  # 71
EXIT_RESET = os.EX_IOERR  # 74
EXIT_TIMEOUT = os.EX_TEMPFAIL  # 75
EXIT_CLOSED_EARLY = os.EX_PROTOCOL  # 76
EXIT_TLS = os.EX_NOPERM  # 77
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it

MEANINGS = {
    EXIT_OK: "success: every check passed (every byte intact), or stdin ended",
    EXIT_USAGE: "bad command line",
    EXIT_MISMATCH: "the reply differs from what was expected (the report names the offset)",
    EXIT_RESOLVE: "the host name could not be resolved",
    EXIT_REFUSED: "connection refused, or no socket at the --unix path",
    EXIT_SOCKET: "any other socket error (unreachable network, permission denied, ...)",
    EXIT_RESET: "connection reset by the server",
    EXIT_TIMEOUT: "timed out (--timeout) connecting or waiting for the reply",
    EXIT_CLOSED_EARLY: "the server closed the connection before the whole reply came back",
    EXIT_TLS: "the TLS handshake failed (certificate not trusted, or ours refused)",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
}


class ClientError(Exception):
    """A failure to report as one line on stderr with its own exit code."""

    exit_code = EXIT_SOCKET


class ResolveFailed(ClientError):
    """The host name did not resolve to an address."""

    exit_code = EXIT_RESOLVE


class Refused(ClientError):
    """Nothing accepts connections at the address."""

    exit_code = EXIT_REFUSED


class Reset(ClientError):
    """The server reset the connection."""

    exit_code = EXIT_RESET


class TimedOut(ClientError):
    """Connecting, or waiting for the reply, took longer than --timeout."""

    exit_code = EXIT_TIMEOUT


class ClosedEarly(ClientError):
    """The server closed the connection before the whole reply came back."""

    exit_code = EXIT_CLOSED_EARLY


class Mismatch(ClientError):
    """The reply differs from what was sent (or, for chargen and info, from the protocol)."""

    exit_code = EXIT_MISMATCH


class TlsFailed(ClientError):
    """The TLS handshake failed."""

    exit_code = EXIT_TLS
