"""systemd socket activation: adopt listening sockets passed in LISTEN_FDS.

Stub: the systemd issue implements this.
"""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping


def inherited_sockets(
    environ: MutableMapping[str, str] | None = None,
) -> list[tuple[str, socket.socket]]:
    """Return (name, socket) for each fd systemd passed, made non-blocking.

    Only when LISTEN_PID is ours; removes LISTEN_* from environ so children do not inherit them.
    Empty outside socket activation.
    """
    environ = os.environ if environ is None else environ
    return []
