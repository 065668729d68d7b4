"""The end of connections: idle timeouts (closed in batches), and the stop: listeners
close, open connections echo what arrives then FIN, the rest is forced closed at
shutdown_timeout or a second SIGINT.
"""

from __future__ import annotations

import signal
import socket
import time

import structlog

from epolld.config import Config
from epolld.core.idle import IdleTimer
from epolld.core.loop import Reactor
from epolld.observability.health import Readiness
from epolld.service.admission import Admission
from epolld.service.proxied import Proxied
from epolld.systemd import Notifier
from epolld.tcp.connection import Connection
from epolld.tcp.reset import reset_on_close, unacked_bytes
from epolld.udp.endpoint import UdpEndpoints

log = structlog.get_logger("epolld")

# Closes between two polls: at most this many, and no more once they took IDLE_CLOSE_CPU_S.
# 500 cost 40 ms of a turn's CPU at 16,700 connections per worker and held a ping-pong
# beside six expiring workers on one core for 250 ms; 100 held it 67-127 ms, with 19 turns
# of any worker over 100 ms in one wave: six workers that each close for 8-20 ms make every
# one of them wait for the others' batches (bench/analysis.md, the 100,000 connections).
IDLE_CLOSES_PER_TURN = 100
IDLE_CLOSE_CPU_S = 0.003


class Drain:
    """Close idle connections, and drain everything at a stop.

    Args:
        reactor: the process's reactor.
        config: the configuration in force (`configure()` switches it).
        notifier: sd_notify (STOPPING=1, EXTEND_TIMEOUT_USEC).
        admission, proxied, udp: the parts whose sockets a stop closes.
        idle: the idle timer the connections are filed in.
        readiness: the process's (/readyz, the agent check): a stop sets `stopping`.
    """

    def __init__(
        self,
        reactor: Reactor,
        config: Config,
        notifier: Notifier,
        admission: Admission,
        proxied: Proxied,
        udp: UdpEndpoints,
        idle: IdleTimer,
        readiness: Readiness,
    ) -> None:
        self.reactor = reactor
        self._config = config
        self._notifier = notifier
        self._admission = admission
        self._proxied = proxied
        self._udp = udp
        self.idle = idle
        self._readiness = readiness
        self._expiring: list[Connection] = []  # idle, waiting for their turn to close
        self._done = False

    def configure(self, new: Config) -> None:
        """A reload: a new idle timeout applies to the open connections too."""
        old, self._config = self._config, new
        if new.limits.idle_timeout_s != old.limits.idle_timeout_s:
            self.idle.retime(new.limits.idle_timeout_s, self._admission.connections())

    # -- idle ----------------------------------------------------------------------

    def sweep_idle(self) -> None:
        self._expiring.extend(self.idle.expired(self.reactor.now))  # type: ignore[arg-type]
        self._close_expired()

    def _close_expired(self) -> None:
        """Close expired connections in batches (IDLE_CLOSES_PER_TURN, IDLE_CLOSE_CPU_S),
        polling in between: 20,000 expiring at once held the loop for 175-360 ms when closed
        in one go. The CPU clock, not the wall clock: a worker that waits for a shared core
        still closes a batch's worth per turn."""
        expiring = self._expiring
        if not expiring or self._admission.handed_over:  # nothing due, or the next process has it
            return
        now = self.reactor.now
        until = time.thread_time() + IDLE_CLOSE_CPU_S
        for _ in range(min(IDLE_CLOSES_PER_TURN, len(expiring))):
            conn = expiring.pop()
            if conn.sock.fileno() < 0 or conn.idle_bucket is not None:  # closed, re-filed
                continue
            if conn.active_at + self.idle.timeout_s > now:  # woke up while it waited
                self.idle.add(conn)
                continue
            reset_if_unread(conn.sock)
            self._admission.close(conn, "idle_timeout")
            if time.thread_time() > until:
                break
        if expiring:
            self.reactor.call_soon(self._close_expired)

    # -- stopping ------------------------------------------------------------------

    def on_stop_signal(self, signum: int) -> None:
        if self._admission.stopping:
            if signum == signal.SIGINT:  # a second Ctrl-C: stop now
                self._force_stop("SIGINT")
            return
        self.stop(signal.Signals(signum).name)

    def stop(self, why: str) -> None:
        """Graceful stop: close listeners, echo what was received, FIN, then exit."""
        admission = self._admission
        admission.stopping = self._readiness.stopping = True
        timeout_s = self._config.shutdown_timeout_s
        log.info(
            "shutdown_started", signal=why, connections=admission.conn_count, timeout_s=timeout_s
        )
        self._notifier.stopping(f"stopping: draining {admission.conn_count} connections")
        self._notifier.extend_timeout(timeout_s + 5.0)
        admission.close_listeners()
        self._udp.close_all()  # nothing to drain: a datagram is answered at once or never
        self._proxied.close_readers()  # nothing to echo yet: nothing to drain
        # The metrics endpoint stays open until the loop ends: /readyz answers 503 (the
        # process's readiness says stopping) while the connections drain.
        for conn in admission.connections():
            self.reactor.set_mask(conn, conn.begin_shutdown())
        self.reactor.call_later(timeout_s, self._force_stop)
        if not admission.conn_count:
            self.finish()

    def _force_stop(self, signal_name: str | None = None) -> None:
        """Close what is left, unsent output dropped: at shutdown_timeout or a second SIGINT."""
        if not self._done:
            left = self._admission.conn_count
            self.close_all()
            if left or signal_name:
                reason = "second_signal" if signal_name else "shutdown_timeout"
                log.warning("shutdown_forced", reason=reason, signal=signal_name, connections=left)
        self.finish()

    def close_all(self) -> None:
        """Close every connection now, its unsent output dropped."""
        for conn in self._admission.connections():
            conn.discard_pending()
            self._admission.close(conn, "shutdown")

    def finish(self) -> None:
        self._done = True
        self.reactor.stop()


def reset_if_unread(sock: socket.socket) -> bool:
    """Before an idle close: when the peer has not taken what was sent to it (SIOCOUTQ above
    0 after idle_timeout without traffic), make close() send an RST (SO_LINGER 0).

    A FIN would queue behind that echo, which a peer that never reads never takes: the peer
    would never hear of the close, and the kernel would keep the closed socket and its send
    queue (autotuned up to tcp_wmem's 4 MiB) in FIN-WAIT-1 for minutes. 1,000 such peers
    kept the kernel's TCP memory above its pressure line (issue 20, scenario 5). nginx's
    reset_timedout_connection does the same. Returns True when the close will be a reset.
    """
    if unacked_bytes(sock.fileno()) == 0:  # or not a socket that says: close as always
        return False
    try:
        reset_on_close(sock)
    except OSError:
        return False
    return True
