"""discard, chargen and info on a TLS listener with `faults:`: the faults apply to the
plaintext, with the meanings faults/services.py gives them on plain TCP.

Chosen at accept (service/admission.py) for a TLS service listener with faults; the
others keep services/tls.py's classes. Each is a FaultyTlsConnection (faults/tls.py):
its Shaper, timers, deadline, close (our close_notify, then FIN) and reset (RST once
OpenSSL has written everything and SIOCOUTQ is 0) are TLS echo's; what goes into the
Shaper is the service's output, and what the client sends is decrypted and dropped
(services/tls.py's drop_records).

- chargen: the pattern goes through the Shaper a record at a time (`bandwidth` shapes
  it; close_after_bytes / reset_after_bytes count plaintext sent); `delay` (plus
  jitter) delays the start, once.
- discard: close_after_bytes / reset_after_bytes count plaintext received.
- info: the line waits `delay` (plus jitter); a byte limit cuts it; then close_notify
  and FIN (or the RST the limit asks for).

A TLS session cannot travel through a restart handoff: what the Shaper holds is sent with
close_notify, as for TLS echo with faults.
"""

from __future__ import annotations

import socket
import ssl
import time
from typing import TYPE_CHECKING, Any, ClassVar, Final

from epolld.core.loop import CLOSE
from epolld.faults.services import stream_start
from epolld.faults.tls import FaultyTlsConnection
from epolld.services.stream import CYCLE_BYTES, WINDOW
from epolld.services.tls import GENERATE_RECORDS, drop_records, info_line, open_tls_service
from epolld.tcp.connection import EPOLLOUT, SharedSettings
from epolld.tls.connection import CLOSING, ECHO, RECORD_BYTES

if TYPE_CHECKING:
    from epolld.faults.connection import FaultPlan
    from epolld.tls.serving import TlsServing


class FaultyTlsService(FaultyTlsConnection):
    """What the three share: the plaintext received is dropped; bytes_out is what the
    service produced (`generated`) less what waits or was dropped."""

    __slots__ = ("about", "generated")
    SERVICE: ClassVar[str]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.generated = 0
        self.about: tuple[str, Any] = ("", None)  # the listener's name, the PROXY header

    @property
    def bytes_out(self) -> int:
        return self.generated - self.pending() - self.dropped

    def _read(self, ev: int, budget: int) -> bool:
        return drop_records(self, ev, budget)


class FaultyTlsDiscard(FaultyTlsService):
    """discard: the byte limit counts plaintext received; then close_notify or RST."""

    __slots__ = ()
    SERVICE = "discard"

    def _read(self, ev: int, budget: int) -> bool:
        before = self.bytes_in
        go_on = drop_records(self, ev, budget)
        shaper = self.shaper
        assert shaper is not None
        if shaper.limit_left is not None and not self.ending:
            shaper.limit_left = max(0, shaper.limit_left - (self.bytes_in - before))
            if not shaper.limit_left:  # _wait ends it
                self.ending = self._limit_kind()
                self.reading = False
        return go_on


class FaultyTlsChargen(FaultyTlsService):
    """chargen: the pattern into the Shaper, released to OpenSSL while the socket takes it."""

    __slots__ = ("start_at",)
    SERVICE = "chargen"

    def attach(self, plan: FaultPlan, now: float) -> None:
        super().attach(plan, now)
        self.start_at, self.shaper = stream_start(plan, self.opened_at, now)

    def _established(self) -> None:
        super()._established()
        self.shared.reschedule((self.fd, EPOLLOUT))  # start without waiting for the client

    def _wait(self) -> int:
        plan = self.plan
        if plan is not None and self.phase == ECHO and not self.eof and not self.ending:
            now = plan.reactor.now
            if not self._generate(now):
                return CLOSE
            if now < self.start_at:
                self._wake_at(self.start_at)
        return super()._wait()  # the release of what the bucket held, the end, the mask

    def _generate(self, now: float) -> bool:
        """Generate, shape and write, at most GENERATE_RECORDS records; False: failed."""
        shaper, plan = self.shaper, self.plan
        assert shaper is not None
        assert plan is not None
        for _ in range(GENERATE_RECORDS):
            if self.out or shaper.exhausted or now < self.start_at:
                return True
            if not shaper.queued:
                start = self.generated % CYCLE_BYTES
                self.generated += shaper.push(WINDOW[start : start + RECORD_BYTES], now)
            data, held = shaper.release(now)
            if held:
                plan.count("bandwidth")
            if data is None:
                return True  # the bucket is empty: _wait sets the timer
            try:
                self.tls.write(data)
            except ssl.SSLWantWriteError:  # the socket is full: EPOLLOUT says when
                self.out = data  # a retry must start with the same bytes
                return True
            except (ssl.SSLError, OSError) as e:
                self.reason = "error"
                self.error = f"tls: {e}"
                return False
            if shaper.queued:
                return True  # the bucket let a part out: the rest when it refills
        self.shared.reschedule((self.fd, EPOLLOUT))  # more next turn, after the others
        return True


class FaultyTlsInfo(FaultyTlsService):
    """info: the line through the Shaper (delayed, or cut), then close_notify and FIN."""

    __slots__ = ()
    SERVICE = "info"

    def _established(self) -> None:
        super()._established()
        shaper, plan = self.shaper, self.plan
        assert shaper is not None
        assert plan is not None
        line = info_line(self, self.about)
        if line is None:
            return
        # The clock now: the delay counts from the end of the handshake.
        self.generated = shaper.push(line, time.monotonic())
        if shaper.delays:
            plan.count("delay")
        self.phase = CLOSING  # _wait releases the line, then close_notify (or the limit's end)
        self.reading = False
        self.shared.reschedule((self.fd, EPOLLOUT))


_CLASSES: Final[dict[str, type[FaultyTlsService]]] = {
    cls.SERVICE: cls for cls in (FaultyTlsDiscard, FaultyTlsChargen, FaultyTlsInfo)
}


def open_faulty_tls_service(
    plan: FaultPlan,
    serving: TlsServing,
    service: str,
    context: ssl.SSLContext,
    sock: socket.socket,
    ip: str,
    *,
    buf: memoryview,
    shared: SharedSettings,
    now: float,
    peer: str | None,
    edge: bool,
    listener: str,
    header: Any,
) -> FaultyTlsService:
    """The connection of a TLS service listener with faults."""
    conn = open_tls_service(
        serving, service, context, sock, ip, buf=buf, shared=shared, now=now, peer=peer,
        edge=edge, listener=listener, header=header, cls=_CLASSES[service],
    )  # fmt: skip
    assert isinstance(conn, FaultyTlsService)
    conn.attach(plan, now)
    return conn
