"""The metrics endpoint's HTTP/1.1 conversation and pages, on bytes alone (no socket).

HttpConversation is sans-IO: these tests feed it what a client would send and read what it
would put on the wire, with the real MetricsApp and prometheus_client behind it. The same
behaviour over real sockets against the daemon is in tests/test_metrics_endpoint.py.
"""

from __future__ import annotations

import h11
import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_text

from epolld.core.counters import Counters, Snapshot
from epolld.observability.http11 import MAX_HEAD_BYTES, HttpConversation
from epolld.observability.metrics import MetricsApp

OPENMETRICS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)  # what Prometheus 2.42 sends


def conversation() -> HttpConversation:
    counters = Counters(accepted=3, bytes_received=10, bytes_sent=10)
    return HttpConversation(MetricsApp(lambda: Snapshot(counters, 1, 2, False)).respond)


def request(method: str = "GET", path: str = "/metrics", *headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: localhost", *headers, "", ""]
    return "\r\n".join(lines).encode()


def take(conv: HttpConversation) -> bytes:
    """Everything the conversation wants to send now, as the socket would take it."""
    sent = b""
    while conv.output:
        chunk = bytes(conv.output)
        sent += chunk
        conv.sent(len(chunk))
    return sent


def responses(data: bytes, method: str = "GET") -> list[tuple[h11.Response, bytes]]:
    """Parse what the server sent with h11's client side."""
    client = h11.Connection(h11.CLIENT)
    result: list[tuple[h11.Response, bytes]] = []
    client.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
    client.send(h11.EndOfMessage())
    client.receive_data(data)
    response: h11.Response | None = None
    body = b""
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA or event is h11.PAUSED:
            return result
        if isinstance(event, h11.Response):
            response, body = event, b""
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert response is not None
            result.append((response, body))
            if client.our_state is h11.MUST_CLOSE or client.their_state is h11.MUST_CLOSE:
                return result
            client.start_next_cycle()
            client.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
            client.send(h11.EndOfMessage())


def header(response: h11.Response, name: bytes) -> bytes | None:
    return next((v for k, v in response.headers if k == name), None)


def test_get_metrics_is_prometheus_text() -> None:
    """GET /metrics answers 200 in text format 0.0.4 that Prometheus' parser reads."""
    conv = conversation()
    conv.receive(request())
    [(response, body)] = responses(take(conv))
    assert response.status_code == 200
    assert header(response, b"content-type") == b"text/plain; version=0.0.4; charset=utf-8"
    families = {f.name: f for f in parse_text(body.decode())}
    assert families["epolld_connections_accepted"].samples[0].value == 3
    assert "process_resident_memory_bytes" in families
    assert not conv.closing


def test_openmetrics_when_accept_asks() -> None:
    """An Accept header naming application/openmetrics-text gets OpenMetrics, ending in # EOF."""
    conv = conversation()
    conv.receive(request("GET", "/metrics", f"Accept: {OPENMETRICS_ACCEPT}"))
    [(response, body)] = responses(take(conv))
    assert (header(response, b"content-type") or b"").startswith(b"application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
    names = {f.name for f in parse_openmetrics(body.decode())}
    assert {"epolld_connections", "epolld_received_bytes", "epolld_build_info"} <= names


def test_index_page_links_to_metrics() -> None:
    """GET / is a short HTML page with a link to /metrics."""
    conv = conversation()
    conv.receive(request("GET", "/"))
    [(response, body)] = responses(take(conv))
    assert response.status_code == 200
    assert header(response, b"content-type") == b"text/html; charset=utf-8"
    assert b'href="/metrics"' in body


@pytest.mark.parametrize("path", ["/", "/metrics"])
def test_head_has_get_headers_and_no_body(path: str) -> None:
    """HEAD answers with GET's status and Content-Length but sends no body."""
    get, head = conversation(), conversation()
    get.receive(request("GET", path))
    head.receive(request("HEAD", path))
    [(get_response, get_body)] = responses(take(get))
    sent = take(head)
    [(head_response, head_body)] = responses(sent, method="HEAD")
    assert head_response.status_code == get_response.status_code == 200
    assert head_body == b""
    assert sent.endswith(b"\r\n\r\n")
    length = int(header(head_response, b"content-length") or b"-1")
    # /metrics changes between scrapes (CPU time): the length is close, not equal.
    assert abs(length - len(get_body)) < 64 if path == "/metrics" else length == len(get_body)


def test_unknown_path_is_404() -> None:
    """A path other than / and /metrics gets 404, and the connection stays usable."""
    conv = conversation()
    conv.receive(request("GET", "/favicon.ico"))
    [(response, _)] = responses(take(conv))
    assert response.status_code == 404
    assert not conv.closing
    conv.receive(request())
    [(response, _)] = responses(take(conv))
    assert response.status_code == 200


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS", "BREW"])
def test_other_methods_are_405_with_allow(method: str) -> None:
    """A method other than GET and HEAD gets 405 with Allow: GET, HEAD, then a close."""
    conv = conversation()
    conv.receive(request(method, "/metrics"))
    [(response, _)] = responses(take(conv))
    assert response.status_code == 405
    assert header(response, b"allow") == b"GET, HEAD"
    assert conv.closing


def test_query_string_is_ignored() -> None:
    """/metrics?x=1 is /metrics."""
    conv = conversation()
    conv.receive(request("GET", "/metrics?name[]=epolld_connections"))
    [(response, _)] = responses(take(conv))
    assert response.status_code == 200


def test_incomplete_head_over_limit_is_431_and_closed() -> None:
    """More than 8 KiB without the end of the head: 431, closing, and nothing more is read."""
    conv = conversation()
    conv.receive(b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"a" * MAX_HEAD_BYTES)
    [(response, _)] = responses(take(conv))
    assert response.status_code == 431
    assert conv.closing
    assert not conv.reading


def test_complete_head_over_limit_is_431() -> None:
    """A whole head larger than 8 KiB arriving at once is refused too, not just a partial one."""
    conv = conversation()
    conv.receive(request("GET", "/metrics", "X-Pad: " + "a" * MAX_HEAD_BYTES))
    [(response, _)] = responses(take(conv))
    assert response.status_code == 431
    assert conv.closing


def test_head_just_under_limit_is_served() -> None:
    """A head of exactly 8 KiB is within the limit."""
    base = len(request("GET", "/metrics", "X-Pad: "))
    conv = conversation()
    conv.receive(request("GET", "/metrics", "X-Pad: " + "a" * (MAX_HEAD_BYTES - base)))
    [(response, _)] = responses(take(conv))
    assert response.status_code == 200


def test_malformed_request_is_400_and_closed() -> None:
    """Bytes that are not HTTP get 400 and a close."""
    conv = conversation()
    conv.receive(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n")
    [(response, _)] = responses(take(conv))
    assert response.status_code == 400
    assert conv.closing


def test_pipelined_requests_answered_one_at_a_time() -> None:
    """Pipelined requests get one response pending at a time, the next once it was sent."""
    conv = conversation()
    conv.receive(request("GET", "/") * 3)
    first = bytes(conv.output)
    assert first.count(b"HTTP/1.1 200") == 1
    assert not conv.reading
    conv.sent(len(first))
    second = bytes(conv.output)
    assert second.count(b"HTTP/1.1 200") == 1
    conv.sent(len(second))
    conv.sent(len(conv.output))
    assert conv.responses == 3
    assert conv.reading


def test_request_with_body_is_answered_then_closed() -> None:
    """A request that carries a body is answered and the connection closed, the body unread."""
    conv = conversation()
    conv.receive(request("GET", "/metrics", "Content-Length: 5") + b"hello")
    [(response, _)] = responses(take(conv))
    assert response.status_code == 200
    assert header(response, b"connection") == b"close"
    assert conv.closing


def test_http10_is_answered_and_closed() -> None:
    """An HTTP/1.0 request is answered, then the connection is closed."""
    conv = conversation()
    conv.receive(b"GET /metrics HTTP/1.0\r\n\r\n")
    data = take(conv)
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert conv.closing


def test_end_of_file_mid_head_closes() -> None:
    """A client that closes in the middle of a head is closed (400 for what it is worth)."""
    conv = conversation()
    conv.receive(b"GET /metr")
    conv.receive(b"")
    assert conv.closing


def test_end_of_file_between_requests_closes_quietly() -> None:
    """A client that closes after its answer has nothing more sent to it."""
    conv = conversation()
    conv.receive(request())
    take(conv)
    conv.receive(b"")
    assert conv.closing
    assert take(conv) == b""
