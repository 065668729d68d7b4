"""Faults on a listener (issue 22) through the real daemon (`python -m epolld` as a
subprocess) on loopback, in both trigger modes (edge also with io: splice, which a fault
listener overrides by copying).

Every timing check is a lower bound (a delay at least what was asked; never faster than
the bandwidth plus one burst): a slow machine may be slower, never faster.
"""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from epolld.config import Faults
from epolld.faults.shaper import BURST_BYTES
from tests.epolld_process import WAIT_S, Daemon, write_config
from tests.test_handoff_store import FakeSystemd
from tests.test_handoff_store import _hand_over as hand_over
from tests.test_handoff_store import _start as store_start
from tests.test_handoff_store import systemd as systemd  # the fixture
from tests.traffic import connect, recv_exactly, recv_until_eof

DELAY = Faults(delay_s=0.15, jitter_s=0.05)
CLOSE_BYTES = Faults(close_after_bytes=10_000)
RESET_BYTES = Faults(reset_after_bytes=100_000)
BANDWIDTH = Faults(bandwidth_bytes_per_s=256 * 1024)
AFTER_S = 0.3
CLOSE_TIME = Faults(close_after_s=AFTER_S)
RESET_TIME = Faults(reset_after_s=AFTER_S)
PROXIED_DELAY = Faults(delay_s=0.16)
SLOW = Faults(delay_s=2.0)  # the memory test: a fast writer meets a long delay
UDP_DROP = Faults(drop=0.5)
UDP_DELAY = Faults(delay_s=0.1, jitter_s=0.02)
HIGH_WATER_BYTES = 1024 * 1024


def entry(address: str, faults: Faults, **more: Any) -> dict[str, Any]:
    """A listen mapping with faults, written as the YAML keys."""
    return {"address": address, "faults": faults.active(), **more}


def address_of(daemon: Daemon, faults: Faults) -> tuple[str, int]:
    """(host, port) of the listener whose `listening` line names these faults."""
    for line in daemon.wait_for("listening"):
        if line.get("faults") == faults.active():
            host, _, port = line["address"].removeprefix("udp:").rpartition(":")
            return host, int(port)
    raise AssertionError(f"no listener with {faults.active()}")


def stats(daemon: Daemon) -> dict[str, Any]:
    count = len(daemon.events("stats")) + 1
    daemon.signal(signal.SIGUSR1)
    return daemon.wait_for("stats", count=count)[-1]


MODES = {
    "level": {"trigger": "level"},
    "edge-splice": {"trigger": "edge", "io": "splice"},
}


@pytest.fixture(scope="module", params=list(MODES))
def daemon(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Daemon]:
    """One daemon per mode with a listener for each fault."""
    # One loopback address each: the same address with port 0 twice is a duplicate entry.
    tcp = (DELAY, CLOSE_BYTES, RESET_BYTES, BANDWIDTH, CLOSE_TIME, RESET_TIME, SLOW)
    listen = [entry(f"127.0.0.{i + 1}:0", faults) for i, faults in enumerate(tcp)]
    listen += [entry("127.0.0.99:0", PROXIED_DELAY, proxy_protocol=True)]
    listen += [entry(f"udp:127.0.0.{i + 1}:0", f) for i, f in enumerate((UDP_DROP, UDP_DELAY))]
    config = {
        "listen": listen,
        **MODES[request.param],
        "buffers": {"high_water": "1MiB", "low_water": "256KiB"},
        "logging": {"level": "info", "connections": True},
        "stats_interval": "0s",
        "metrics": {"listen": "127.0.0.1:0"},
    }
    path = write_config(tmp_path_factory.mktemp("faults") / "epolld.yaml", config)
    started = Daemon(path)
    try:
        started.wait_for("listening", count=len(listen))
        yield started
    finally:
        started.stop()
    assert not started.bad_lines


def test_delay_is_at_least_what_was_asked_and_keeps_order(daemon: Daemon) -> None:
    """Each chunk comes back no sooner than its delay after it was sent, every byte in order."""
    host, port = address_of(daemon, DELAY)
    chunks = [bytes([65 + i]) * 100 for i in range(15)]
    with connect(port, host) as sock:
        sent_at = []
        for chunk in chunks:
            sent_at.append(time.monotonic())
            sock.sendall(chunk)
            time.sleep(0.01)
        got, arrivals = bytearray(), []
        sock.settimeout(WAIT_S)
        while len(got) < 1500:
            data = sock.recv(65536)
            assert data
            got += data
            arrivals.append((time.monotonic(), len(got)))
    assert bytes(got) == b"".join(chunks)
    for i, sent in enumerate(sent_at):
        arrived = next(t for t, total in arrivals if total >= 100 * (i + 1))
        assert arrived - sent >= DELAY.delay_s
    opened = daemon.wait_for("connection_opened", faults=DELAY.active())[-1]
    assert opened["io"] == "copy"  # also with io: splice


def test_close_after_bytes_sends_exactly_n_then_fin(daemon: Daemon) -> None:
    """The client receives exactly close_after_bytes of its echo, then EOF."""
    host, port = address_of(daemon, CLOSE_BYTES)
    payload = bytes(range(256)) * 200  # 51,200 bytes
    with connect(port, host) as sock:
        sock.sendall(payload)
        assert recv_until_eof(sock) == payload[: CLOSE_BYTES.close_after_bytes]
    closed = daemon.wait_for("connection_closed", reason="fault_close")[-1]
    assert closed["bytes_out"] == CLOSE_BYTES.close_after_bytes


def test_reset_after_bytes_sends_exactly_n_then_rst(daemon: Daemon) -> None:
    """The client receives exactly reset_after_bytes, then a reset (not a FIN)."""
    host, port = address_of(daemon, RESET_BYTES)
    # A little more than the limit, so that sendall() is done long before the reset: a
    # reset is reported once, to the first call that meets it (a send would hide it).
    payload = bytes(range(251)) * 400 + b"beyond"
    with connect(port, host) as sock:
        sock.sendall(payload)
        got = bytearray()
        reset = False
        try:
            while data := sock.recv(65536):
                got += data
        except ConnectionResetError:
            reset = True
        assert reset, "a FIN instead of a reset"
    assert bytes(got) == payload[: RESET_BYTES.reset_after_bytes]


def test_close_and_reset_after_a_time(daemon: Daemon) -> None:
    """close_after: echo until then, then EOF; reset_after: then a reset; neither early."""
    close_host, close_port = address_of(daemon, CLOSE_TIME)
    reset_host, reset_port = address_of(daemon, RESET_TIME)
    started = time.monotonic()
    with connect(close_port, close_host) as closing, connect(reset_port, reset_host) as resetting:
        for sock in (closing, resetting):
            sock.sendall(b"hello")
            assert recv_exactly(sock, 5) == b"hello"
        assert recv_until_eof(closing) == b""
        assert time.monotonic() - started >= AFTER_S
        resetting.settimeout(WAIT_S)
        with pytest.raises(ConnectionResetError):
            resetting.recv(100)
        assert time.monotonic() - started >= AFTER_S


def test_bandwidth_is_never_exceeded_beyond_one_burst(daemon: Daemon) -> None:
    """At every moment the client has received at most one burst plus rate x time."""
    host, port = address_of(daemon, BANDWIDTH)
    rate = BANDWIDTH.bandwidth_bytes_per_s
    payload = b"b" * (384 * 1024)
    started = time.monotonic()  # before accept: the bound is only looser
    with connect(port, host) as sock:
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        got = 0
        sock.settimeout(WAIT_S)
        while got < len(payload):
            data = sock.recv(65536)
            assert data
            got += len(data)
            assert got <= BURST_BYTES + rate * (time.monotonic() - started)
        sender.join(WAIT_S)


def test_fast_writer_to_a_delay_listener_leaves_memory_bounded(daemon: Daemon) -> None:
    """Delayed bytes count against high_water: the daemon stops reading a client that writes
    as fast as it can, so neither what the client got in nor the daemon's memory grows."""
    host, port = address_of(daemon, SLOW)
    rss_before = daemon.rss_bytes()
    written = 0
    with connect(port, host) as sock:
        sock.setblocking(False)
        chunk = b"m" * 65536
        stalled_since = None
        deadline = time.monotonic() + 3.0
        while written < 512 * 1024 * 1024 and time.monotonic() < deadline:
            try:
                written += sock.send(chunk)
                stalled_since = None
            except BlockingIOError:
                stalled_since = stalled_since or time.monotonic()
                if time.monotonic() - stalled_since > 0.5:
                    break
                time.sleep(0.01)
        rss_after = daemon.rss_bytes()
    # high_water, plus what the kernel buffers hold on both sides (a few MiB each).
    assert written < 32 * 1024 * 1024
    assert rss_after - rss_before < 16 * 1024 * 1024


def test_proxy_header_then_delayed_echo(daemon: Daemon) -> None:
    """Behind a PROXY header the payload, not the header, is echoed after the delay."""
    host, port = address_of(daemon, PROXIED_DELAY)
    with connect(port, host) as sock:
        started = time.monotonic()
        sock.sendall(b"PROXY TCP4 192.0.2.1 192.0.2.2 5000 7\r\npayload")
        assert recv_exactly(sock, 7) == b"payload"
        assert time.monotonic() - started >= PROXIED_DELAY.delay_s


def test_udp_drop_and_delay(daemon: Daemon) -> None:
    """drop: some datagrams are not answered, and each one is counted; delay: every answer
    comes no sooner than asked."""
    drop_address = address_of(daemon, UDP_DROP)
    delay_address = address_of(daemon, UDP_DELAY)
    before = stats(daemon).get("faults", {})
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for i in range(100):
            sock.sendto(b"%d" % i, drop_address)
        answered = 0
        sock.settimeout(0.5)
        with contextlib.suppress(TimeoutError):
            while True:
                sock.recv(100)
                answered += 1
        assert 10 < answered < 90  # 1 in 2**57 of failing by chance
        sock.settimeout(WAIT_S)
        for i in range(5):
            started = time.monotonic()
            sock.sendto(b"late %d" % i, delay_address)
            assert sock.recv(100) == b"late %d" % i
            assert time.monotonic() - started >= UDP_DELAY.delay_s
    after = stats(daemon)["faults"]
    assert after["drop"] - before.get("drop", 0) == 100 - answered
    assert after["delay"] - before.get("delay", 0) >= 5


def faults_metric(daemon: Daemon) -> dict[str, float]:
    """epolld_faults_total by kind, scraped from the metrics endpoint."""
    address = daemon.wait_for("metrics_listening")[0]["address"]
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=WAIT_S) as response:
        text = response.read().decode()
    found = re.findall(r'^epolld_faults_total\{kind="(\w+)"\} (\S+)$', text, re.MULTILINE)
    return {kind: float(value) for kind, value in found}


def test_metrics_count_faults_by_kind(daemon: Daemon) -> None:
    """epolld_faults_total{kind} has every kind from the start and counts a close."""
    before = faults_metric(daemon)
    assert set(before) == {"delay", "bandwidth", "close", "reset", "drop"}
    host, port = address_of(daemon, CLOSE_BYTES)
    with connect(port, host) as sock:
        sock.sendall(b"c" * 20_000)
        assert len(recv_until_eof(sock)) == CLOSE_BYTES.close_after_bytes
    deadline = time.monotonic() + WAIT_S
    while faults_metric(daemon)["close"] == before["close"]:
        assert time.monotonic() < deadline, "the close was not counted"
        time.sleep(0.05)


# -- a reload, the restart handoff, workers --------------------------------------------


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for one in started:
        one.stop()
        assert not one.bad_lines


def test_reload_gives_new_connections_the_new_faults(tmp_path: Path, daemons: list[Daemon]) -> None:
    """Open connections keep the faults they were accepted with; new ones get the file's."""
    path = tmp_path / "epolld.yaml"
    settings: dict[str, Any] = {"listen": [entry("127.0.0.1:0", Faults(delay_s=0.3))]}
    daemon = Daemon(write_config(path, settings))
    daemons.append(daemon)
    host, port = address_of(daemon, Faults(delay_s=0.3))
    old = connect(port, host)
    old.sendall(b"accepted")  # accepted before the reload: it has the old faults
    assert recv_exactly(old, 8) == b"accepted"
    settings["listen"] = [entry(f"{host}:{port}", Faults(close_after_bytes=3))]
    write_config(path, settings)
    daemon.signal(signal.SIGHUP)
    daemon.wait_for("config_reloaded")
    with old, connect(port, host) as new:
        new.sendall(b"abcdef")
        assert recv_until_eof(new) == b"abc"
        started = time.monotonic()
        old.sendall(b"abcdef")
        assert recv_exactly(old, 6) == b"abcdef"  # not cut at 3
        assert time.monotonic() - started >= 0.3  # still delayed


@pytest.mark.parametrize("trigger", ["level", "edge"])
def test_restart_handoff_carries_delayed_chunks(
    tmp_path: Path, daemons: list[Daemon], trigger: str
) -> None:
    """SIGUSR2 while echoes wait for their delay: they travel, and arrive in full, in order,
    no sooner than asked."""
    faults = Faults(delay_s=0.4)
    settings = {"listen": [entry("127.0.0.1:0", faults)], "trigger": trigger}
    daemon = Daemon(write_config(tmp_path / "epolld.yaml", settings))
    daemons.append(daemon)
    host, port = address_of(daemon, faults)
    payload = bytes(range(256)) * 64
    with connect(port, host) as sock:
        started = time.monotonic()
        sock.sendall(payload)
        time.sleep(0.05)  # read by the daemon, not yet echoed
        daemon.signal(signal.SIGUSR2)
        complete = daemon.wait_for("handoff_complete")[0]
        assert complete["connections"] == 1
        assert recv_exactly(sock, len(payload)) == payload
        assert time.monotonic() - started >= faults.delay_s
        sock.sendall(b"after")
        assert recv_exactly(sock, 5) == b"after"


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])  # the wildcard: PKTINFO
def test_restart_handoff_carries_held_udp_replies(
    tmp_path: Path, daemons: list[Daemon], host: str
) -> None:
    """SIGUSR2 while UDP replies wait for their delay: the next process sends each once
    (from the address asked, on a wildcard socket), no sooner than asked."""
    faults = Faults(delay_s=0.5)
    settings = {"listen": [entry(f"udp:{host}:0", faults)]}
    daemon = Daemon(write_config(tmp_path / "epolld.yaml", settings))
    daemons.append(daemon)
    _, port = address_of(daemon, faults)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect(("127.0.0.1", port))  # a reply from another address is not received
        sock.settimeout(WAIT_S)
        started = time.monotonic()
        for i in range(3):
            sock.send(b"held %d" % i)
        time.sleep(0.05)  # read by the daemon, not yet answered
        daemon.signal(signal.SIGUSR2)
        daemon.wait_for("handoff_complete")
        replies = sorted(sock.recv(100) for _ in range(3))
        assert time.monotonic() - started >= faults.delay_s
        assert replies == [b"held 0", b"held 1", b"held 2"]
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):  # each once
            sock.recv(100)


def test_workers_serve_fault_listeners(tmp_path: Path, daemons: list[Daemon]) -> None:
    """With workers, each worker's connections of a delay listener are delayed."""
    faults = Faults(delay_s=0.2)
    settings = {
        "listen": [entry("127.0.0.1:0", faults)],
        "workers": 2,
        "logging": {"connections": True},
    }
    daemon = Daemon(write_config(tmp_path / "epolld.yaml", settings))
    daemons.append(daemon)
    daemon.wait_for("workers_ready")
    host, port = address_of(daemon, faults)
    socks = [connect(port, host) for _ in range(6)]
    try:
        started = time.monotonic()
        for i, sock in enumerate(socks):
            sock.sendall(b"w%d" % i)
        for i, sock in enumerate(socks):
            assert recv_exactly(sock, 2) == b"w%d" % i
        assert time.monotonic() - started >= faults.delay_s
    finally:
        for sock in socks:
            sock.close()
    opened = daemon.wait_for("connection_opened", count=6)
    assert all(line["faults"] == faults.active() for line in opened)


def test_stop_lets_delayed_echoes_out_then_fin(tmp_path: Path, daemons: list[Daemon]) -> None:
    """SIGTERM: what waits for its delay still goes out, then a FIN, and the daemon exits 0."""
    faults = Faults(delay_s=0.3)
    daemon = Daemon(
        write_config(
            tmp_path / "epolld.yaml",
            {"listen": [entry("127.0.0.1:0", faults)], "logging": {"connections": True}},
        )
    )
    daemons.append(daemon)
    host, port = address_of(daemon, faults)
    with connect(port, host) as sock:
        sock.sendall(b"still echoed")
        daemon.wait_for("connection_opened")
        time.sleep(0.05)  # read: waiting for its delay
        daemon.signal(signal.SIGTERM)
        assert recv_until_eof(sock) == b"still echoed"
    assert daemon.wait() == 0


def test_fd_store_handoff_carries_delayed_chunks(
    tmp_path: Path, daemons: list[Daemon], systemd: FakeSystemd
) -> None:
    """Through systemd's file descriptor store (played by the test, as in
    test_handoff_store.py) delayed echoes travel too, and the connection keeps its faults."""
    faults = Faults(delay_s=0.4, close_after_bytes=20_000)
    config_path = write_config(tmp_path / "epolld.yaml", {"listen": [entry("127.0.0.1:0", faults)]})
    first = store_start(config_path, systemd, [])
    daemons.append(first)
    host, port = address_of(first, faults)
    payload = bytes(range(256)) * 40  # 10,240 bytes
    with connect(port, host) as sock:
        started = time.monotonic()
        sock.sendall(payload)
        time.sleep(0.05)  # read by the daemon, waiting for its delay
        second = store_start(config_path, systemd, hand_over(first, systemd))
        daemons.append(second)
        assert second.wait_for("handoff_complete")[0]["connections"] == 1
        assert recv_exactly(sock, len(payload)) == payload
        assert time.monotonic() - started >= faults.delay_s
        sock.sendall(payload)  # the faults it was accepted with: cut at 20,000 bytes
        assert recv_until_eof(sock) == payload[: 20_000 - len(payload)]
