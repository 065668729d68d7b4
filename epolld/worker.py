"""One worker process (workers: > 1): an EchoService on the listeners its supervisor
bound, reporting to the supervisor over a SOCK_SEQPACKET socketpair.

A packet is one message, so there is no framing to get wrong:

- worker -> supervisor, JSON: {"kind": "ready"}, {"kind": "heartbeat" | "stats",
  "stats": ..., "counters": ...}, {"kind": "reloaded", "error": null | "why"}.
- supervisor -> worker: b"C" + pickle(Config) (apply it, as SIGHUP would), b"S" (report
  the statistics now). The supervisor is the same program in the parent process: the
  pickle never crosses a trust boundary.

A worker never talks to systemd (its Notifier has an empty environment): the supervisor
is the service's main process and the only one systemd accepts messages from.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import select
import socket
from collections.abc import Callable
from typing import Any

import structlog

from epolld.config import Config
from epolld.listeners import Listener
from epolld.loop import CLOSE
from epolld.service import EchoService
from epolld.systemd import Notifier

log = structlog.get_logger("epolld")

MESSAGES_PER_EVENT = 16  # the supervisor sends a few a minute; bound the work anyway
MAX_PACKET = 1 << 20  # a pickled Config is a few KiB


class SupervisorLink:
    """The worker's end of the socketpair, as a reactor handler."""

    __slots__ = ("_config", "_ready_sent", "_service", "active_at", "fd", "mask", "sock")

    def __init__(self, sock: socket.socket, config: Config) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.fd = sock.fileno()
        self.mask = select.EPOLLIN
        self.active_at = 0.0
        self._config = config
        self._ready_sent = False
        self._service: EchoService | None = None

    def serve(self, service: EchoService) -> None:
        self._service = service

    def config(self) -> Config:
        """The reload source: the configuration the supervisor sent last."""
        return self._config

    def ready(self) -> None:
        if not self._ready_sent:
            self._ready_sent = True
            self.send({"kind": "ready"})

    def heartbeat(self) -> None:
        """From the worker's own loop: a stuck loop stops checking in."""
        self._report("heartbeat")

    def _report(self, kind: str) -> None:
        service = self._service
        if service is not None:
            counters = dataclasses.asdict(service.counters)
            self.send({"kind": kind, "stats": service.stats(), "counters": counters})

    def send(self, message: dict[str, Any]) -> None:
        try:
            self.sock.send(json.dumps(message).encode())
        except OSError as e:  # full (the supervisor is behind) or gone: the next one counts
            log.debug("supervisor_send_failed", error=str(e))

    def on_event(self, events: int) -> int:
        service = self._service
        for _ in range(MESSAGES_PER_EVENT):
            try:
                packet = self.sock.recv(MAX_PACKET)
            except BlockingIOError:
                return self.mask
            except OSError:
                packet = b""
            if not packet:  # the supervisor is gone: nobody would replace or stop us
                if service is not None:
                    log.warning("supervisor_gone")
                    service.stop("supervisor_gone")
                return CLOSE
            if packet[:1] == b"C" and service is not None:
                self._config = pickle.loads(packet[1:])
                self.send({"kind": "reloaded", "error": service.reload()})
            elif packet[:1] == b"S":
                self._report("stats")
        return self.mask

    def close(self) -> None:
        self.sock.close()

    def __repr__(self) -> str:
        return f"<SupervisorLink fd={self.fd}>"


class WorkerNotifier(Notifier):
    """A worker's sd_notify: nothing reaches systemd; readiness goes to the supervisor."""

    def __init__(self, link: SupervisorLink) -> None:
        super().__init__(environ={})
        self._link = link

    def ready(self, status: str) -> None:
        self._link.ready()


def run(
    index: int,
    config: Config,
    listeners: list[Listener],
    sock: socket.socket,
    heartbeat_s: float,
    before_reload: Callable[[], None],
) -> int:
    """Serve as worker `index` until SIGTERM (or the supervisor goes away)."""
    structlog.contextvars.bind_contextvars(worker=index)
    os.environ.pop("NOTIFY_SOCKET", None)  # only the supervisor talks to systemd
    for listener in listeners:
        listener.keep_path = True  # the supervisor's to remove, at its exit
    link = SupervisorLink(sock, config)

    def reload_source() -> Config:
        before_reload()  # daemon mode: reopen the log file, as the supervisor did
        return link.config()

    service = EchoService(config, listeners, WorkerNotifier(link), reload=reload_source)
    link.serve(service)
    service.reactor.add(link)
    service.reactor.every(lambda: heartbeat_s, link.heartbeat)
    return service.run()
