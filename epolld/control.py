"""The operator's control socket: `epolld --drain`, `--undrain` and `--drain-status` talk
to the running daemon through a Unix socket (SIGUSR1 and SIGUSR2 are taken, and a
command can answer).

Where: control.socket, or with "auto" (the default) $RUNTIME_DIRECTORY/control.sock, the
directory systemd makes for the unit (RuntimeDirectory=epolld: /run/epolld, owned by its
dynamic user); without systemd, "auto" means no socket unless the file names one (daemon
mode: beside the pidfile, for example /run/epolld.control). The socket is the main
process's (the supervisor's with workers), mode 0600, and a client must be root or the
daemon's own user (SO_PEERCRED): draining takes a server out of its balancer.

The protocol is one line each way: the client sends a command (`drain`, `undrain`,
`status`), the daemon answers one JSON object and closes. An operator's drain lasts
through a reload and a restart handoff (it travels in the handoff state) until
`undrain`; a stop and start ends it.
"""

from __future__ import annotations

import json
import os
import select
import socket
import struct
from collections.abc import Callable
from typing import Any

import structlog

from epolld.config import ListenAddress
from epolld.core.loop import CLOSE, Handler, Reactor
from epolld.errors import BindError, EpolldError
from epolld.listening import sockets
from epolld.listening.endpoint import Endpoint, EndpointClient
from epolld.listening.sockets import Listener

log = structlog.get_logger("epolld")

COMMANDS = ("drain", "undrain", "status")
SOCKET_MODE = 0o600
DEFAULT_SYSTEMD_PATH = "/run/epolld/control.sock"  # the packaged unit's RuntimeDirectory=
MAX_LINE_BYTES = 256
CLIENT_TIMEOUT_S = 2.0  # for the command line to arrive
MAX_CLIENTS = 8
_UCRED = struct.Struct("3i")  # pid, uid, gid: struct ucred (socket(7), SO_PEERCRED)

Act = Callable[[str], dict[str, Any]]


class ControlError(EpolldError):
    """The daemon could not be asked (no socket, refused, no answer): exit 69."""

    exit_code = os.EX_UNAVAILABLE


def peer_uid(sock: socket.socket) -> int:
    """The connecting process's uid, as the kernel saw it at connect()."""
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return int(_UCRED.unpack(data)[1])


class ControlEndpoint(Endpoint):
    """The control socket on the daemon's reactor, and its clients (listening/endpoint.py
    accepts).

    Args:
        reactor: the daemon's reactor.
        listener: the bound Unix socket (bind()); the endpoint owns it from now on.
        act: runs a command, returns the answer (the process's `control()`).
    """

    accept_per_event = 16
    paused_event = "control_accept_paused"
    failed_event = "control_accept_failed"

    def __init__(self, reactor: Reactor, listener: Listener, act: Act) -> None:
        self._act = act
        super().__init__(reactor, listener)

    def serve(self, sock: socket.socket) -> None:
        uid = peer_uid(sock)
        if uid not in (0, os.geteuid()) or self.clients >= MAX_CLIENTS:
            log.warning("control_refused", uid=uid, clients=self.clients)
            sock.close()
            return
        self.attach(ControlClient(sock, self._reactor, self._act, self.forget))


class ControlClient(EndpointClient):
    """One client: read its command line, answer it, close."""

    __slots__ = ("_act", "_buffer", "_out")

    timeout_s = CLIENT_TIMEOUT_S

    def __init__(
        self,
        sock: socket.socket,
        reactor: Reactor,
        act: Act,
        forget: Callable[[Handler], None],
    ) -> None:
        super().__init__(sock, reactor, forget)
        self._act = act
        self._buffer = b""
        self._out = b""

    def on_event(self, events: int) -> int:
        if not self._out:
            try:
                data = self.sock.recv(MAX_LINE_BYTES)
            except BlockingIOError:
                return self.mask
            except OSError:
                return CLOSE
            self._buffer += data
            if b"\n" not in self._buffer and data and len(self._buffer) < MAX_LINE_BYTES:
                return select.EPOLLIN
            self._out = self._answer(self._buffer.partition(b"\n")[0])
        try:
            sent = self.sock.send(self._out)
        except BlockingIOError:
            return select.EPOLLOUT
        except OSError:
            return CLOSE
        self._out = self._out[sent:]
        return select.EPOLLOUT if self._out else CLOSE

    def _answer(self, line: bytes) -> bytes:
        command = line.decode("ascii", "replace").strip()
        if command not in COMMANDS:
            reply: dict[str, Any] = {
                "ok": False,
                "error": f"unknown command {command[:40]!r}; try {', '.join(COMMANDS)}",
            }
        else:
            reply = {"ok": True, **self._act(command)}
        return json.dumps(reply).encode() + b"\n"


def bind(path: str) -> Listener:
    """Bind the control socket at path, mode 0600; a file left by a process that is gone
    is replaced, one a live process listens on is not.

    Raises:
        BindError: it cannot be bound (another epolld holds it, no such directory...).
    """
    try:
        return sockets.bind(ListenAddress("unix", path=path, mode=SOCKET_MODE), MAX_CLIENTS)
    except BindError as e:
        raise BindError(f"control.socket: {e}", errno=e.errno) from None


def ask(path: str, command: str, timeout_s: float = 5.0) -> dict[str, Any]:
    """Send command to the daemon listening at path; its answer.

    Raises:
        ControlError: no daemon answers there, or it refused.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.connect(path)
            sock.sendall(command.encode() + b"\n")
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
        except (BrokenPipeError, ConnectionResetError):
            data = b""  # closed without a word: refused
        except FileNotFoundError:
            raise ControlError(
                f"{path}: no such socket (is epolld running, with control.socket set?)"
            ) from None
        except OSError as e:
            raise ControlError(f"{path}: {e.strerror or e}") from None
    try:
        reply = json.loads(data)
    except ValueError:
        raise ControlError(f"{path}: no answer (refused: root or the daemon's user only)") from None
    if not isinstance(reply, dict) or not reply.get("ok"):
        raise ControlError(f"{path}: {reply.get('error') if isinstance(reply, dict) else reply}")
    return reply
