"""A TLS echo connection of a listener with `faults:`: the faults apply to the plaintext.

Chosen at accept (service/admission.py) for a TLS listener with faults; a TLS listener
without them keeps tls/connection.py's TlsConnection and pays nothing per event. The
handshake, backpressure, close_notify, stop and restart are TlsConnection's; what
differs is the echo: each decrypted chunk goes through a Shaper (shaper.py) instead of
straight back to OpenSSL, and a timer writes it once it is due and the bucket allows.

- delay, jitter, bandwidth: on the decrypted chunks, as faults/connection.py does for plain
  TCP; delayed plaintext counts against high_water.
- close_after_bytes: exactly N plaintext bytes echoed, then our close_notify, then FIN.
- reset_after_bytes: exactly N echoed, then an RST (SO_LINGER 0) once OpenSSL has
  written every record and the kernel's send queue is empty (SIOCOUTQ 0), as on plain
  TCP: no close_notify, the client sees the reset after the N bytes.
- close_after / reset_after: the same that long after accept (what waits is dropped).
"""

from __future__ import annotations

import ssl
import time
from typing import TYPE_CHECKING, Any

from epolld.core.loop import CLOSE
from epolld.faults.timers import FAULT_SLOTS, PARKED, FaultTimers
from epolld.tcp.connection import EDGE_MASK, EPOLLIN, EPOLLOUT, EPOLLRDHUP, LEVEL_READ
from epolld.tls.connection import CLOSING, ECHO, HANDSHAKE, LINGER, TlsConnection, receive_queued

if TYPE_CHECKING:
    from epolld.faults.connection import FaultPlan
    from epolld.handoff import StateWriter


class FaultyTlsConnection(FaultTimers, TlsConnection):
    """One client of a TLS fault listener (level or edge, as TlsConnection). Its pending()
    is OpenSSL's retry and the delayed plaintext."""

    __slots__ = FAULT_SLOTS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_faults()  # ending: "close" or "reset" once decided

    def attach(self, plan: FaultPlan, now: float) -> None:
        """Start the faults: the Shaper, and the deadline of close_after / reset_after
        (a byte limit of 0 ends the connection right after the handshake)."""
        self._start_faults(plan, now, limit_at_once=False)

    # -- the echo, through the shaper ----------------------------------------------------

    def _established(self) -> None:
        if self.shaper is not None and self.shaper.exhausted:  # *_after_bytes: 0
            self.ending = self._limit_kind()
            self.reading = False

    def _read(self, ev: int, budget: int) -> bool:
        """TlsConnection._read, but each decrypted chunk goes into the shaper."""
        tls, buf, shaper = self.tls, self.buf, self.shaper
        assert shaper is not None
        plan = self.plan
        assert plan is not None
        size = len(buf)
        # The clock now, not the turn's: a delay counts from the read, which may come late
        # in a turn (after a TLS handshake's work, say), never from before it.
        now = time.monotonic()
        while True:
            try:
                n = tls.read(size, buf)
            except ssl.SSLWantReadError:
                return True
            except ssl.SSLEOFError:  # a FIN without close_notify
                self.reason = "truncated"
                self.eof = True
                self.reading = False
                return True
            except ssl.SSLWantWriteError:  # as in TlsConnection._read
                self.shared.reschedule((self.fd, EPOLLIN))
                return True
            except ssl.SSLError as e:
                self.reason = "error"
                self.error = f"tls: {e.reason or e}"
                return False
            except OSError as e:
                self._fail(e)
                return False
            if not n:  # the client's close_notify: its echo (delayed still), then ours
                self.reason = self.reason or "eof"
                self.phase = CLOSING
                self.reading = False
                return True
            self.bytes_in += n
            taken = shaper.push(buf[:n], now)
            if taken < n:  # past the byte limit: never sent
                self.dropped += n - taken
            elif shaper.delays:
                plan.count("delay")
            if self.pending() >= self.shared.high_water:
                self.reading = False
                return True
            if n == size and tls.pending():
                continue
            budget -= 1
            if not budget:
                if self.edge_mode:
                    self.shared.reschedule((self.fd, ev & (EPOLLIN | EPOLLRDHUP) or EPOLLIN))
                return True
            if not ev & EPOLLRDHUP and not receive_queued(self.fd):
                return True

    def _wait(self) -> int:
        """Release what is due to OpenSSL, decide the end, then what to wait for."""
        if self.phase not in (ECHO, CLOSING) or self.plan is None:
            return super()._wait()
        now = self.plan.reactor.now
        shaper = self.shaper
        assert shaper is not None
        if self.ending:
            return self._end(now)
        if shaper.queued and not self.out:
            data, held = shaper.release(now)
            if held:
                self.plan.count("bandwidth")
            if data is not None:
                try:
                    self.tls.write(data)
                except ssl.SSLWantWriteError:  # OpenSSL holds a part: retry with the same
                    self.out = data
                except ssl.SSLError as e:
                    self.reason = "error"
                    self.error = f"tls: {e.reason or e}"
                    return CLOSE
                except OSError as e:
                    return self._fail(e)
        if (
            not self.reading
            and not self.eof
            and self.phase == ECHO
            and self.pending() <= self.shared.low_water
        ):
            self.reading = True
            if self.edge_mode:  # what arrived while paused raises no new edge
                self.shared.reschedule((self.fd, EPOLLIN | EPOLLRDHUP))
        if not self.pending():
            if shaper.exhausted:
                self.ending = self._limit_kind()
                return self._end(now)
            return super()._wait()  # close_notify after the client's, or read on
        if shaper.queued and not self.out:
            when = shaper.wake_at(now)
            if when is not None:
                self._wake_at(when)
        if self.edge_mode:
            return EDGE_MASK
        if self.out:
            return EPOLLOUT | (LEVEL_READ if self.reading else 0)
        return LEVEL_READ if self.reading else PARKED

    def _on_timer(self) -> None:
        self.timer = None
        self._from_timer(self._wait)

    def _on_deadline(self, kind: str) -> None:
        self.deadline = None
        if self.ending or self.phase == LINGER:
            return
        self.ending = kind
        self.reading = False
        self.discard_pending()  # the time is up: what waits is dropped
        self._from_timer(lambda: self._end(self.plan.reactor.now))  # type: ignore[union-attr]

    def _from_timer(self, step: Any) -> None:
        """Run step() outside an event and apply the mask it returns."""
        if self.sock.fileno() < 0:  # closed, or let go after a handoff
            return
        reactor = self.plan.reactor  # type: ignore[union-attr]
        self.active_at = reactor.now
        try:
            mask = step()
        except OSError as e:
            mask = self._fail(e)
        reactor.set_mask(self, mask)

    # -- the end: close_notify and FIN, or RST -------------------------------------------

    def _end(self, now: float) -> int:
        plan = self.plan
        assert plan is not None
        if self.ending == "closed":  # our close_notify is on its way
            return self._close_notify() if self.phase != LINGER else self._wait_readable()
        if self.phase == HANDSHAKE and self.ending == "close":  # close_after came first
            plan.count("close")
            self.reason = "fault_close"
            return CLOSE
        if self.out:  # a record OpenSSL is still writing (the byte limit's last)
            return EDGE_MASK if self.edge_mode else EPOLLOUT
        self.discard_pending()
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
        if self.ending == "reset":
            return self._reset(now)
        plan.count("close")
        self.reason = "fault_close"
        self.ending = "closed"  # counted once; _close_notify may need the socket again
        return self._close_notify()

    def _reset(self, now: float) -> int:
        """An RST once the peer has acknowledged everything written (SIOCOUTQ 0)."""
        return self._reset_once_acked(now, EDGE_MASK if self.edge_mode else PARKED)

    def _flush(self) -> bool:
        """TlsConnection._flush, which resumes reading: not past high_water (the delayed
        chunks count) nor once the end is decided."""
        reading = self.reading
        if not self._flush_tls():
            return False
        if self.reading and not reading and (self.ending or self.pending() > self.shared.low_water):
            self.reading = False
        return True

    _flush_tls = TlsConnection._flush

    def on_event(self, ev: int) -> int:
        if self.ending == "closed":  # our close_notify waits for the socket
            if self.phase == LINGER:
                return self._on_lingering(ev)
            return self._close_notify()
        if self.phase == HANDSHAKE and self.ending:  # the deadline came first
            return self._end(self.plan.reactor.now)  # type: ignore[union-attr]
        return super().on_event(ev)

    # -- restart -------------------------------------------------------------------------

    def handoff_state(self, out: StateWriter) -> dict[str, Any]:
        """A TLS session cannot travel: what was received, delayed or not, is echoed now
        (the delays end here), then close_notify and FIN, as for TLS echo."""
        if self.phase in (ECHO, CLOSING) and self.shaper is not None and not self.ending:
            self._farewell()
            if self.shaper.queued:
                delayed = self.shaper.take_all()
                self.shaper.clear()
                self.out = bytes(self.out) + delayed
        return super().handoff_state(out)
