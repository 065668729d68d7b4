"""The handoff's state format and descriptor transport, in-process on real sockets."""

from __future__ import annotations

import json
import os
import socket
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from structlog.testing import capture_logs

from epolld import handoff


@pytest.fixture
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected loopback TCP pair: (client, server side)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    yield client, server
    client.close()
    server.close()


def _named(transport: handoff.Transport) -> list[tuple[str, int]]:
    """What LISTEN_FDS would pass: dups, as the next process gets its own descriptors."""
    return [(name, os.dup(fd)) for name, fd in transport.named()]


def test_state_round_trip_with_blob_and_trailer() -> None:
    """Records, the bytes they point at and a trailer written afterwards all come back."""
    out = handoff.StateWriter(systemd_keeps_inherited=False)
    ref = out.data(b"pending \x00 bytes")
    out.add({"kind": "thing", "out": ref})
    fd = out.to_memfd({"epolld": "9.9"})
    try:
        out.append_trailer(fd, {"steps": {"send": 0.25}})
        document, blob = handoff.read_state(fd)
    finally:
        os.close(fd)
    assert document["version"] == handoff.FORMAT_VERSION
    assert document["epolld"] == "9.9"
    assert document["steps"] == {"send": 0.25}
    (record,) = document["records"]
    assert blob[record["out"][0] : record["out"][0] + record["out"][1]] == b"pending \x00 bytes"


def test_unknown_version_is_refused_with_the_reason() -> None:
    """A state written in another format version is not guessed at."""
    fd = os.memfd_create("test", os.MFD_CLOEXEC)
    try:
        os.write(fd, handoff.HEADER.pack(handoff.MAGIC, 99, 0, 2, 0) + b"{}")
        with pytest.raises(handoff.HandoffError, match="format version 99"):
            handoff.read_state(fd)
    finally:
        os.close(fd)


def test_descriptors_overflow_into_more_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    """More batches than one pair's send buffer holds go on in further pairs, and every
    descriptor comes back under its index."""
    monkeypatch.setattr(handoff, "PAIR_SNDBUF_BYTES", 1)  # the kernel's minimum
    files = [os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC) for _ in range(3000)]
    try:
        pairs = handoff.send_descriptors(files)
        assert len(pairs) > 1
        received = handoff.receive_descriptors([b.fileno() for _, b in pairs])
        for a, b in pairs:
            a.close()
            b.close()
        assert sorted(received) == list(range(len(files)))
        for index, fd in received.items():
            assert os.path.samestat(os.fstat(fd), os.fstat(files[index]))
            os.close(fd)
    finally:
        for fd in files:
            os.close(fd)


def test_unreadable_state_closes_the_connections_with_a_fin(
    tcp_pair: tuple[socket.socket, socket.socket],
) -> None:
    """A next process that cannot read the state closes what it received: the client gets
    a FIN, not a connection left hanging, and the reason is kept for the log."""
    client, server = tcp_pair
    out = handoff.StateWriter(systemd_keeps_inherited=False)
    out.add({"kind": "connection", "fd": out.fd(server.fileno())})
    pairs = handoff.send_descriptors(out.fds)
    transport = handoff.Transport(out.to_memfd({}), pairs)
    os.pwrite(transport.memfd, struct.pack("<I", 99), 8)  # a version from the future
    passed = _named(transport)
    transport.close()
    server.close()  # the old process's copy: the one in flight keeps the connection open
    state, rest = handoff.take_state([*passed, ("epolld.socket", 99)])
    assert rest == [("epolld.socket", 99)]
    assert state is not None
    assert state.problem is not None
    assert "format version 99" in state.problem
    assert state.closed == 1
    client.settimeout(5)
    assert client.recv(10) == b""


def test_restore_hands_each_kind_to_its_restorer(
    tcp_pair: tuple[socket.socket, socket.socket],
) -> None:
    """Each record reaches the restorer of its kind with its descriptor; a kind nobody
    restores is logged and its descriptor closed."""
    client, server = tcp_pair
    out = handoff.StateWriter(systemd_keeps_inherited=False)
    out.add({"kind": "known", "fd": out.fd(server.fileno())})
    other = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    out.add({"kind": "from-the-future", "fd": out.fd(other)})
    transport = handoff.Transport(out.to_memfd({}), handoff.send_descriptors(out.fds))
    passed = _named(transport)
    transport.close()
    server.close()
    os.close(other)
    state, _ = handoff.take_state(passed)
    assert state is not None
    assert state.problem is None
    taken: list[socket.socket] = []

    def restore_known(record: dict[str, object], state: handoff.State) -> None:
        taken.append(socket.socket(fileno=state.take_fd(int(str(record["fd"])))))

    with capture_logs() as logs:
        counts = handoff.restore(state, {"known": restore_known})
    assert counts == {"known": 1}
    assert [e["event"] for e in logs] == ["handoff_kinds_unknown", "handoff_descriptors_closed"]
    (sock,) = taken
    with sock:
        client.sendall(b"still there")
        sock.settimeout(5)
        assert sock.recv(100) == b"still there"


def test_incomplete_newer_generation_is_drained_and_the_older_complete_one_taken(
    tcp_pair: tuple[socket.socket, socket.socket],
) -> None:
    """A newer handoff whose state counts a pair that was not passed is a leftover: the
    connection in flight in it gets a FIN and its names are to be removed, while the
    older complete handoff beside it is the one taken over."""
    client, server = tcp_pair
    old_out = handoff.StateWriter(systemd_keeps_inherited=True)
    marker = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    old_out.add({"kind": "marker", "fd": old_out.fd(marker)})
    older = handoff.Transport(
        old_out.to_memfd({"generation": "0000000a", "pairs": 1}),
        handoff.send_descriptors(old_out.fds),
        "0000000a",
    )
    new_out = handoff.StateWriter(systemd_keeps_inherited=True)
    new_out.add({"kind": "connection", "fd": new_out.fd(server.fileno())})
    newer = handoff.Transport(
        new_out.to_memfd({"generation": "0000000b", "pairs": 2}),  # pair 1 never stored
        handoff.send_descriptors(new_out.fds),
        "0000000b",
    )
    passed = [*_named(newer), *_named(older)]  # newest first, as systemd lists its store
    for transport in (older, newer):
        transport.close()
    server.close()
    os.close(marker)
    state, _ = handoff.take_state(passed)
    assert state is not None
    assert state.problem is None
    assert [r["kind"] for r in state.records] == ["marker"]
    assert sorted(state.transport) == sorted(name for name, _ in older.named())
    assert sorted(state.leftovers) == sorted(name for name, _ in newer.named())
    assert state.leftovers_closed == 1
    client.settimeout(5)
    assert client.recv(10) == b""
    state.close_unused()


def test_records_are_written_as_rows_and_read_back_in_order() -> None:
    """Version 2 writes each distinct key list once and a row per record; the reader
    gives back every record as written, in order, whatever its keys."""
    out = handoff.StateWriter(systemd_keeps_inherited=False)
    records: list[dict[str, Any]] = [
        {"kind": "listener", "fd": 0, "name": "127.0.0.1:7"},
        *({"kind": "connection", "fd": i, "peer": None, "out": [0, i]} for i in range(1, 4)),
        {"kind": "udp", "fd": 4},
        {"kind": "connection", "fd": 5, "peer": "x", "out": None},
    ]
    for record in records:
        out.add(record)
    fd = out.to_memfd({})
    try:
        raw = os.pread(fd, os.fstat(fd).st_size, 0)
        document, _ = handoff.read_state(fd)
    finally:
        os.close(fd)
    assert raw.count(b'"peer"') == 1  # the connections' keys are written once
    assert document["version"] == 2
    assert document["records"] == records


def test_a_version_1_state_is_still_read() -> None:
    """A state from a release before rows (a dict per record) is read as it was."""
    text = json.dumps(
        {"format": handoff.FORMAT, "version": 1, "records": [{"kind": "thing", "out": [0, 3]}]}
    ).encode()
    fd = os.memfd_create("test", os.MFD_CLOEXEC)
    try:
        os.write(fd, handoff.HEADER.pack(handoff.MAGIC, 1, 0, len(text), 3) + text + b"abc")
        document, blob = handoff.read_state(fd)
    finally:
        os.close(fd)
    assert document["records"] == [{"kind": "thing", "out": [0, 3]}]
    assert blob == b"abc"


def test_rows_that_do_not_fit_their_key_lists_are_refused() -> None:
    """A row naming a key list that is not there makes the state unreadable, said so."""
    with pytest.raises(handoff.HandoffError, match="key lists"):
        handoff.untabulate([["kind"]], [[3, "connection"]])
