"""The metrics endpoint under the shipped unit's sandbox, in a real systemd 252.

The sandbox matters here: ProcSubset=pid would hide /proc/stat and leave the process
collector empty, and DynamicUser with ProtectSystem=strict leaves only /run/epolld for a
Unix socket endpoint.
"""

from __future__ import annotations

import http.client
from collections.abc import Iterator

import pytest
from nspawn import Container

pytestmark = pytest.mark.system

HOST = "127.0.0.1"  # in the container's network namespace, which the c fixture enters
PORT = 7080
METRICS_PORT = 9707
IO_TIMEOUT_S = 10.0


@pytest.fixture
def c(epolld_container: Container) -> Iterator[Container]:
    """The module's container with the service stopped before and after each test; the
    test's sockets are created in the container's network namespace."""
    epolld_container.systemctl("stop", "epolld.socket", "epolld.service")
    epolld_container.systemctl("reset-failed", check=False)
    with epolld_container.network():
        yield epolld_container
    epolld_container.systemctl("stop", "epolld.service", check=False)


def scrape(port: int) -> str:
    """GET /metrics over http.client (no proxy from the environment is consulted)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=IO_TIMEOUT_S)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        assert response.status == 200
        return response.read().decode()
    finally:
        conn.close()


def test_metrics_with_process_collector_under_the_sandbox(c: Container) -> None:
    """Under the shipped unit, /metrics serves the epolld_* and the process_* metrics."""
    c.write_file(
        "/etc/epolld.yaml",
        f'listen:\n  - "{HOST}:{PORT}"\nmetrics:\n  listen: "{HOST}:{METRICS_PORT}"\n',
    )
    c.systemctl("start", "epolld")
    text = scrape(METRICS_PORT)
    assert "\nepolld_connections 0.0\n" in text
    assert "\nprocess_resident_memory_bytes " in text, "the process collector needs /proc/stat"
    assert "\nprocess_open_fds " in text
    assert c.show("epolld.service", "ActiveState") == "active"


def test_unix_socket_metrics_in_the_runtime_directory(c: Container) -> None:
    """A unix: metrics endpoint in /run/epolld works under DynamicUser."""
    c.write_file(
        "/etc/epolld.yaml",
        f'listen:\n  - "{HOST}:{PORT}"\nmetrics:\n  listen: "unix:/run/epolld/metrics.sock"\n',
    )
    c.systemctl("start", "epolld")
    client = (
        "import socket; s = socket.socket(socket.AF_UNIX); s.settimeout(10); "
        "s.connect('/run/epolld/metrics.sock'); "
        "s.sendall(b'GET /metrics HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n'); "
        "d = b''.join(iter(lambda: s.recv(65536), b'')); print(d.split(b'\\r\\n')[0].decode())"
    )
    assert c.run("python3", "-c", client).stdout == "HTTP/1.1 200 OK\n"
