"""HTTP/1.1 for the metrics endpoint, without a socket: bytes in, bytes out.

h11 parses and frames (it was made for event loops that own their sockets); this module
adds the endpoint's policy on top: a request head larger than MAX_HEAD_BYTES is refused
with 431 and the connection closed, HEAD gets GET's headers without the body, a request
that is malformed gets 400 and a close, and a request that carries a body is answered,
then the connection closed rather than the body read (a metrics endpoint takes none).

At most one response is pending at a time: while output waits, `reading` is False, so a
client that pipelines requests without reading the answers is not read either.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus

import h11

MAX_HEAD_BYTES = 8 * 1024  # request line and headers; more is refused with 431

_METHODS_WITHOUT_BODY = frozenset({"GET", "HEAD"})


@dataclass(frozen=True, slots=True)
class Request:
    """What the endpoint needs of a request: the method, the path and the Accept header."""

    method: str  # "GET", "HEAD", or whatever the client sent
    path: str  # the target without its query string
    accept: str  # the Accept header, "" if absent


@dataclass(frozen=True, slots=True)
class Reply:
    """A complete response; HttpConversation adds the framing headers."""

    status: int
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


Respond = Callable[[Request], Reply]


class HttpConversation:
    """One client's HTTP/1.1 conversation: feed it what was received, send what it gives.

    Args:
        respond: turns a request into a reply (called for HEAD too: the body is dropped).
    """

    def __init__(self, respond: Respond) -> None:
        self._respond = respond
        # h11 refuses an incomplete head beyond this size; a complete one is checked here.
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        self._out = bytearray()
        self._head_bytes = 0  # bytes received since the current request began
        self.closing = False  # close once the output is sent; nothing more is read
        self.responses = 0  # replies completed, for the caller's per-request deadline

    def __repr__(self) -> str:
        return (
            f"<HttpConversation client={self._h11.their_state.__name__}"
            f" server={self._h11.our_state.__name__} out={len(self._out)}"
            f"{' closing' if self.closing else ''}>"
        )

    @property
    def reading(self) -> bool:
        """Whether more input is wanted now: not while a response is pending or closing."""
        return not self.closing and not self._out

    @property
    def output(self) -> bytes | bytearray:
        """The bytes waiting to be sent; call sent() with how many the socket took."""
        return self._out

    def sent(self, count: int) -> None:
        """Forget the first count bytes of output, which the socket has taken.

        Once the output is all sent, a request the client pipelined behind it is answered.
        """
        del self._out[:count]
        if not self._out:
            self._step(self._process)

    def receive(self, data: bytes) -> None:
        """Feed bytes from the client, b"" at end of file, and answer a complete request."""
        if self.closing:
            return
        self._head_bytes += len(data)
        self._step(lambda: self._h11.receive_data(data))
        self._step(self._process)

    def _step(self, action: Callable[[], None]) -> None:
        if self.closing:
            return
        try:
            action()
        except h11.RemoteProtocolError as e:
            self._refuse(e.error_status_hint, str(e))

    def _process(self) -> None:
        """Answer the next complete request, if one is there and no response is pending."""
        conn = self._h11
        while not self.closing and not self._out:
            if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                conn.start_next_cycle()
                self._head_bytes = len(conn.trailing_data[0])
            event = conn.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                head_size = self._head_bytes - len(conn.trailing_data[0])
                if head_size > MAX_HEAD_BYTES:
                    self._refuse(431, "Request head too large")
                    return
                self._answer(event)
            elif isinstance(event, h11.ConnectionClosed):
                self.closing = True
            if conn.our_state is h11.MUST_CLOSE:
                self.closing = True

    def _answer(self, event: h11.Request) -> None:
        method = event.method.decode("ascii", "replace")
        target = event.target.decode("ascii", "replace")
        accept = b", ".join(v for k, v in event.headers if k == b"accept")
        request = Request(method, target.partition("?")[0], accept.decode("latin-1"))
        reply = self._respond(request)
        # A body (or a method that may carry one) is not read: answer, then close.
        has_body = any(
            k == b"transfer-encoding" or (k == b"content-length" and v.strip() != b"0")
            for k, v in event.headers
        )
        close = has_body or method not in _METHODS_WITHOUT_BODY
        self._send_reply(reply, include_body=method != "HEAD", close=close)
        self.responses += 1

    def _refuse(self, status: int, why: str) -> None:
        """Answer a request that cannot be served, if a response can still be sent; close."""
        if self._h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            body = f"{why}\n".encode()
            reply = Reply(status, "text/plain; charset=utf-8", body)
            with contextlib.suppress(h11.LocalProtocolError):  # h11 cannot frame it: close
                self._send_reply(reply, include_body=True, close=True)
        self.closing = True

    def _send_reply(self, reply: Reply, *, include_body: bool, close: bool) -> None:
        headers = [
            ("Content-Type", reply.content_type),
            ("Content-Length", str(len(reply.body))),
            *reply.headers,
        ]
        if close:
            headers.append(("Connection", "close"))
        send = self._h11.send
        reason = HTTPStatus(reply.status).phrase.encode()
        response = h11.Response(status_code=reply.status, headers=headers, reason=reason)
        self._out += send(response) or b""
        if include_body and reply.body:
            self._out += send(h11.Data(data=reply.body)) or b""
        self._out += send(h11.EndOfMessage()) or b""
