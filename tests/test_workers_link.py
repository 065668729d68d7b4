"""The messages on a worker's socketpair (workers/link.py), over a real SOCK_SEQPACKET
socketpair: what one end sends, the other reads, descriptors included."""

from __future__ import annotations

import os
import select
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from epolld.config import load_config
from epolld.core.loop import CLOSE
from epolld.workers import link
from epolld.workers.link import Down, Up, WorkerLink


class _Slot:
    index = 3


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    yield ours, theirs
    ours.close()
    theirs.close()


def _received(ours: socket.socket) -> tuple[WorkerLink[_Slot], list[Any]]:
    got: list[Any] = []
    worker_link = WorkerLink(ours, _Slot(), lambda slot, m, fds: got.append((slot, m, fds)))
    return worker_link, got


def test_up_messages_arrive_with_their_descriptors(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """A worker's messages reach the supervisor's handler one per packet, in order, and a
    handed_over message brings its descriptors, still open."""
    ours, theirs = pair
    r, w = os.pipe()
    try:
        theirs.send(link.encode({"kind": Up.READY, "restored": 2}))
        named = link.encode({"kind": Up.HANDED_OVER, "names": ["memfd", "pair"]})
        theirs.sendmsg([named], link.rights([r, w]))
        worker_link, got = _received(ours)
        assert worker_link.on_event(select.EPOLLIN) == select.EPOLLIN
        assert [m for _, m, _ in got] == [
            {"kind": "ready", "restored": 2},
            {"kind": "handed_over", "names": ["memfd", "pair"]},
        ]
        assert got[0][2] == []
        fds = got[1][2]
        assert len(fds) == 2
        os.write(fds[1], b"x")  # our copy of the write end, into the pipe
        assert os.read(r, 1) == b"x"
        link.close_all(fds)
    finally:
        os.close(r)
        os.close(w)


def test_invalid_packet_is_dropped_with_its_descriptors(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """A packet that is not a JSON object is logged and dropped, its descriptors closed,
    and the worker's hang-up closes the link."""
    ours, theirs = pair
    r, w = os.pipe()
    try:
        theirs.sendmsg([b"[1, 2]"], link.rights([w]))
        theirs.send(b"not json")
        worker_link, got = _received(ours)
        with capture_logs() as logs:
            assert worker_link.on_event(select.EPOLLIN) == select.EPOLLIN
        assert got == []
        assert [e["event"] for e in logs] == ["worker_message_invalid"] * 2
        assert all(e["worker"] == 3 for e in logs)
        os.close(w)
        w = -1
        assert os.read(r, 1) == b""  # the only write end left was the dropped copy
        theirs.close()
        assert worker_link.on_event(select.EPOLLIN) == CLOSE
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_down_packets_carry_the_configuration(
    tmp_path: Path, pair: tuple[socket.socket, socket.socket]
) -> None:
    """The supervisor's requests are one kind byte each, and a configuration sent down is
    the same configuration at the worker's end."""
    path = tmp_path / "epolld.yaml"
    path.write_text("listen: ['127.0.0.1:0']\nworkers: 2\n")
    config = load_config(str(path))
    ours, theirs = pair
    worker_link, _ = _received(ours)
    for packet in (link.config_packet(config), Down.STATS, Down.HAND_OVER):
        assert worker_link.send(packet)
    first = theirs.recv(link.MAX_PACKET)
    assert first[:1] == Down.CONFIG
    assert link.config_of(first) == config
    assert [theirs.recv(16), theirs.recv(16)] == [b"S", b"H"]
