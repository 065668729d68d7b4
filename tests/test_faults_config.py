"""`faults:` on a listen entry: what is read, what is refused at which line, what is printed;
and the Shaper (faults/shaper.py) on bytes alone: order, delay, bandwidth, byte limit; the
bound on held UDP replies (faults/datagram.py) in process."""

from __future__ import annotations

import pathlib

import pytest

from epolld.config import Faults, ListenAddress, changes, describe, load_config, render_config
from epolld.errors import ConfigError
from epolld.faults.shaper import BURST_BYTES, Shaper
from epolld.listening.sockets import socket_of


def load(tmp_path: pathlib.Path, text: str) -> tuple[ListenAddress, ...]:
    path = tmp_path / "epolld.yaml"
    path.write_text(text, encoding="utf-8")
    return load_config(str(path)).listen


def test_every_key_is_read_with_its_unit(tmp_path: pathlib.Path) -> None:
    """Durations, a bandwidth with or without /s, byte counts and a drop fraction."""
    tcp, udp = load(
        tmp_path,
        "listen:\n"
        '  - {address: "127.0.0.1:0", faults: {delay: 200ms, jitter: 50ms, bandwidth: 1MiB/s,'
        " close_after_bytes: 1000, close_after: 2s, reset_after_bytes: 0, reset_after: 1m}}\n"
        '  - {address: "udp:127.0.0.1:0", faults: {drop: 0.25, delay: 10ms}}\n',
    )
    assert tcp.faults == Faults(
        delay_s=0.2,
        jitter_s=0.05,
        bandwidth_bytes_per_s=1024 * 1024,
        close_after_bytes=1000,
        close_after_s=2.0,
        reset_after_bytes=0,
        reset_after_s=60.0,
    )
    assert udp.faults == Faults(drop=0.25, delay_s=0.01)
    assert socket_of(tcp) == socket_of(ListenAddress("ipv4", "127.0.0.1", 0))


def test_tls_echo_and_services_take_their_faults(tmp_path: pathlib.Path) -> None:
    """chargen takes every TCP key; discard its ends; info its delay and ends; UDP info drop
    and delay (TLS echo, every TCP key: tests/test_faults_services.py starts one)."""
    every = (
        "{delay: 1s, jitter: 1s, bandwidth: 1KiB, close_after_bytes: 1, close_after: 1s,"
        " reset_after_bytes: 2, reset_after: 2s}"
    )
    chargen, discard, info, udp_info = load(
        tmp_path,
        "listen:\n"
        f'  - {{address: "127.0.0.2:0", service: chargen, faults: {every}}}\n'
        '  - {address: "127.0.0.3:0", service: discard, faults: {reset_after_bytes: 9}}\n'
        '  - {address: "127.0.0.4:0", service: info, faults: {delay: 1s, close_after: 2s}}\n'
        '  - {address: "udp:127.0.0.5:0", service: info, faults: {drop: 0.5, delay: 1s}}\n',
    )
    assert chargen.faults is not None
    assert chargen.faults.bandwidth_bytes_per_s == 1024
    assert chargen.faults.reset_after_s == 2.0
    assert discard.faults == Faults(reset_after_bytes=9)
    assert info.faults == Faults(delay_s=1.0, close_after_s=2.0)
    assert udp_info.faults == Faults(drop=0.5, delay_s=1.0)


def test_no_faults_is_none(tmp_path: pathlib.Path) -> None:
    """An empty faults mapping, or all at their defaults, is a listener without faults."""
    (address,) = load(tmp_path, 'listen: [{address: "127.0.0.1:0", faults: {delay: 0s}}]\n')
    assert address.faults is None


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (
            '{address: "udp:127.0.0.1:0", faults: {bandwidth: 1KiB}}',
            ":3: listen[1].faults.bandwidth: applies to TCP listeners only;"
            " 'udp:127.0.0.1:0' is UDP",
        ),
        (
            '{address: "127.0.0.1:0", faults: {drop: 0.5}}',
            ":3: listen[1].faults.drop: applies to UDP listeners only; '127.0.0.1:0' is TCP",
        ),
        (
            '{address: "127.0.0.1:0", faults: {delai: 1s}}',
            ":3: unknown option 'delai' in listen[1].faults (did you mean 'delay'?)",
        ),
        (
            '{address: "127.0.0.1:0", faults: {delay: -1}}',
            ":3: listen[1].faults.delay: expected a duration such as 30s, 500ms, 2m or a number"
            " of seconds, got -1",
        ),
        (
            '{address: "127.0.0.1:0", faults: {bandwidth: 1MB/s}}',
            ":3: listen[1].faults.bandwidth: expected bytes per second such as 1MiB/s, 64KiB/s"
            " or 500000, got '1MB/s'",
        ),
        (
            '{address: "udp:127.0.0.1:0", faults: {drop: 1.5}}',
            ":3: listen[1].faults.drop: expected a fraction from 0 to 1",
        ),
        (
            '{address: "127.0.0.1:0", faults: {close_after_bytes: true}}',
            ":3: listen[1].faults.close_after_bytes: expected a non-negative integer",
        ),
        ('{address: "127.0.0.1:0", faults: [delay]}', ":3: listen[1].faults: expected a mapping"),
        (
            '{address: "127.0.0.1:0", tls: true, service: discard, faults: {delay: 1s}}',
            ":3: listen[1].faults.delay: a TCP discard listener takes only close_after_bytes,"
            " close_after, reset_after_bytes, reset_after",
        ),
        (
            '{address: "127.0.0.1:0", service: discard, faults: {delay: 1s}}',
            ":3: listen[1].faults.delay: a TCP discard listener takes only close_after_bytes,"
            " close_after, reset_after_bytes, reset_after",
        ),
        (
            '{address: "127.0.0.1:0", service: info,\n     faults: {delay: 1s, bandwidth: 1KiB}}',
            ":4: listen[1].faults.bandwidth: a TCP info listener takes only delay, jitter,"
            " close_after_bytes, close_after, reset_after_bytes, reset_after",
        ),
        (
            '{address: "udp:127.0.0.1:0", service: discard, faults: {drop: 0.5}}',
            ":3: listen[1].faults.drop: a UDP discard listener takes no faults",
        ),
    ],
)
def test_mistakes_are_refused_at_their_line(
    tmp_path: pathlib.Path, entry: str, expected: str
) -> None:
    """Each mistake names its file, line and key path."""
    path = tmp_path / "epolld.yaml"
    path.write_text(f'listen:\n  - "127.0.0.1:7080"\n  - {entry}\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value).startswith(f"{path}{expected}"), str(info.value)


def test_printed_config_reads_back_and_reload_changes_name_faults(
    tmp_path: pathlib.Path,
) -> None:
    """--print-config writes faults that read back equal; changes() and describe() show them."""
    path = tmp_path / "epolld.yaml"
    path.write_text(
        'listen: [{address: "127.0.0.1:0", faults: {delay: 200ms, bandwidth: 64KiB}},'
        ' {address: "udp:127.0.0.1:0", faults: {drop: 0.5}}]\n'
    )
    config = load_config(str(path))
    printed = tmp_path / "printed.yaml"
    printed.write_text(render_config(config))
    again = load_config(str(printed))
    assert again.listen == config.listen
    assert "bandwidth: 64KiB/s" in render_config(config)
    assert "127.0.0.1:0 (faults)" in describe(config)
    path.write_text('listen: [{address: "127.0.0.1:0", faults: {delay: 300ms}}]\n')
    changed = changes(config, load_config(str(path)))
    assert changed["listen"][1] == ["127.0.0.1:0 delay=0.3s"]


def test_asdict_record_restores_equal() -> None:
    """A listener's handoff record (asdict) turns back into the same address, faults included."""
    import dataclasses

    address = ListenAddress("ipv4", "127.0.0.1", 7, faults=Faults(delay_s=1.0))
    assert ListenAddress(**dataclasses.asdict(address)) == address


# -- the Shaper, on bytes -------------------------------------------------------------


def test_shaper_delays_and_keeps_order() -> None:
    """A chunk is due after the delay plus jitter, and never before the chunk ahead of it."""
    draws = iter([1.0, 0.0])  # the first chunk draws the whole jitter, the second none
    shaper = Shaper(Faults(delay_s=0.2, jitter_s=0.1), 0.0, lambda: next(draws))
    shaper.push(b"first", 0.0)
    shaper.push(b"second", 0.05)
    assert shaper.release(0.29) == (None, False)
    assert shaper.wake_at(0.29) == pytest.approx(0.3)
    data, _ = shaper.release(0.31)
    # The second waited for the first: it was due at 0.25.
    assert bytes(data or b"") == b"firstsecond"
    assert shaper.queued == 0


def test_shaper_merges_chunks_so_the_queue_stays_short() -> None:
    """Chunks due within a millisecond share one entry: a byte-at-a-time writer cannot make
    the queue long."""
    shaper = Shaper(Faults(delay_s=0.1), 0.0, lambda: 0.0)
    for i in range(10_000):
        shaper.push(b"x", i * 0.00001)  # 10,000 pushes within 0.1 s
    assert shaper.queued == 10_000
    assert len(shaper.queue) <= 101


def test_shaper_bandwidth_never_exceeds_burst_plus_rate() -> None:
    """Over any run, what is released is at most one burst plus the rate times the time."""
    rate = 10_000
    shaper = Shaper(Faults(bandwidth_bytes_per_s=rate), 0.0, lambda: 0.0)
    shaper.push(b"x" * 1_000_000, 0.0)
    released, now = 0, 0.0
    while shaper.queued:
        now = shaper.wake_at(now) or now
        data, _ = shaper.release(now)
        released += len(data or b"")
        assert released <= BURST_BYTES + rate * now
    assert now >= (1_000_000 - BURST_BYTES) / rate


def test_shaper_takes_no_more_than_the_byte_limit() -> None:
    """close_after_bytes / reset_after_bytes: the smaller limit; the rest is refused."""
    shaper = Shaper(Faults(close_after_bytes=10, reset_after_bytes=7), 0.0, lambda: 0.0)
    assert shaper.push(b"12345", 0.0) == 5
    assert shaper.push(b"67890", 0.0) == 2
    assert shaper.exhausted
    assert bytes(shaper.release(0.0)[0] or b"") == b"1234567"


def test_held_udp_replies_are_bounded() -> None:
    """Delayed UDP replies wait in a bounded heap: past MAX_HELD they are dropped and counted
    (send_buffer), never queued; those held are sent once due."""
    import socket

    from epolld.core.loop import Reactor
    from epolld.faults.datagram import MAX_HELD, DatagramFaults
    from epolld.udp.endpoint import UdpStats

    reactor = Reactor()
    stats, counts = UdpStats(), {}  # type: ignore[var-annotated]
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client,
    ):
        server.bind(("127.0.0.1", 0))
        client.bind(("127.0.0.1", 0))
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        faults = DatagramFaults(Faults(delay_s=0.01), reactor, server, stats, counts)
        target = client.getsockname()
        for i in range(MAX_HELD + 100):
            assert faults.intercept(memoryview(b"%d" % i), target, [], reactor.now)
        assert stats.dropped["send_buffer"] == 100
        assert counts["delay"] == MAX_HELD
        reactor.now += 0.02
        reactor._run_timers(reactor.now)
        assert stats.echoed + stats.dropped["send_buffer"] - 100 == MAX_HELD
        client.settimeout(1)
        assert client.recv(100) == b"0"
        faults.close()
    reactor.release()
