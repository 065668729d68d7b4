"""The link between the supervisor and a worker: one SOCK_SEQPACKET socketpair per worker,
the messages both ends speak on it, and the supervisor's end as a reactor handler
(`WorkerLink`; the worker's end is worker.SupervisorLink).

A packet is one message, so there is no framing to get wrong:

- up, worker -> supervisor: a JSON object whose "kind" is one of `Up` (handed_over
  carries the worker's handoff transport as SCM_RIGHTS; no other up message has fds).
- down, supervisor -> worker: one of `Down`, a kind byte (b"C" is followed by the
  pickled Config). The supervisor is the same program in the parent process: the pickle
  never crosses a trust boundary.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import pickle
import select
import socket
from collections.abc import Callable, Iterable
from typing import Any, Final, Generic, Protocol, TypeVar

import structlog

from epolld import handoff
from epolld.config import Config
from epolld.core.loop import CLOSE

log = structlog.get_logger("epolld")

MAX_PACKET: Final = 1 << 20  # bytes: a pickled Config is a few KiB
MAX_FDS_PER_MESSAGE: Final = 2 * handoff.MAX_PAIRS + 1  # a worker's transport: pairs and memfd
MESSAGES_PER_EVENT: Final = 64  # at the supervisor's end


class Up:
    """The kinds of the worker's messages (JSON objects)."""

    READY: Final = "ready"  # "restored": connections it took over at its start
    HEARTBEAT: Final = "heartbeat"  # "stats", "counters" (not in every one): every heartbeat_s
    STATS: Final = "stats"  # the same, answering Down.STATS
    RELOADED: Final = "reloaded"  # "error": null, or why the reload failed
    HANDED_OVER: Final = "handed_over"  # "names": the transport's FDNAMEs, with its fds
    HANDOFF_FAILED: Final = "handoff_failed"  # "error": why


class Down:
    """The supervisor's requests: the first byte of a packet."""

    LISTENERS: Final = b"L"  # + JSON: the sockets a reload adds to the slot (listener_set
    # .describe() each), as SCM_RIGHTS in the same order: kept for the next CONFIG
    CONFIG: Final = b"C"  # + pickle(Config): apply it, as SIGHUP would: new addresses take
    # the sockets sent before it, removed ones are closed in the worker
    STATS: Final = b"S"  # report the statistics now (Up.STATS)
    HAND_OVER: Final = b"H"  # hand every connection over, up the link, and exit


def encode(message: dict[str, Any]) -> bytes:
    """An up message as its packet."""
    return json.dumps(message).encode()


def decode(packet: bytes) -> dict[str, Any] | None:
    """An up packet as its message; None if it is not a JSON object."""
    try:
        message = json.loads(packet)
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


def config_packet(config: Config) -> bytes:
    return Down.CONFIG + pickle.dumps(config)


def config_of(packet: bytes) -> Config:
    """The Config a Down.CONFIG packet carries."""
    config: Config = pickle.loads(packet[1:])
    return config


def rights(fds: Iterable[int]) -> list[tuple[int, int, array.array[int]]]:
    """The ancillary data that passes fds along with a packet (SCM_RIGHTS)."""
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]


def close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class Peer(Protocol):
    """What a link knows of its slot: which one it is, for the log."""

    @property
    def index(self) -> int: ...


P = TypeVar("P", bound=Peer)


class WorkerLink(Generic[P]):
    """The supervisor's end of a worker's socketpair, as a reactor handler."""

    __slots__ = ("_on_message", "active_at", "fd", "mask", "slot", "sock")

    def __init__(
        self,
        sock: socket.socket,
        slot: P,
        on_message: Callable[[P, dict[str, Any], list[int]], None],
    ) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.fd = sock.fileno()
        self.mask = select.EPOLLIN
        self.active_at = 0.0
        self.slot = slot
        self._on_message = on_message

    def on_event(self, events: int) -> int:
        ancillary = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * 4)
        for _ in range(MESSAGES_PER_EVENT):
            try:
                packet, cmsgs, _flags, _ = self.sock.recvmsg(
                    MAX_PACKET, ancillary, socket.MSG_CMSG_CLOEXEC
                )
            except BlockingIOError:
                return self.mask
            except OSError:
                packet, cmsgs = b"", []
            fds = array.array("i")
            for level, kind, payload in cmsgs:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            if not packet:  # the worker exited; SIGCHLD tells the rest
                close_all(fds)
                return CLOSE
            message = decode(packet)
            if message is None:
                log.warning("worker_message_invalid", worker=self.slot.index)
                close_all(fds)
                continue
            self._on_message(self.slot, message, list(fds))
        return self.mask

    def send(self, packet: bytes, fds: list[int] | None = None) -> bool:
        """One packet down, with descriptors (SCM_RIGHTS) if fds."""
        try:
            if fds:
                self.sock.sendmsg([packet], rights(fds))
            else:
                self.sock.send(packet)
        except OSError as e:
            log.warning("worker_send_failed", worker=self.slot.index, error=str(e))
            return False
        return True

    def close(self) -> None:
        self.sock.close()

    def __repr__(self) -> str:
        return f"<WorkerLink fd={self.fd} worker={self.slot.index}>"
