"""ListenerSet on real sockets: one socket per slot, plans that bind first, commits."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from epolld.config import Config, parse_config
from epolld.errors import BindError
from epolld.listening.listener_set import HandedDown, ListenerSet, describe, from_record


def config(listen: list[str], metrics: str | None = None) -> Config:
    settings: dict[str, object] = {"listen": listen}
    if metrics is not None:
        settings["metrics"] = {"listen": metrics}
    return parse_config(yaml.safe_dump(settings), "test.yaml")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def sets() -> Iterator[list[ListenerSet]]:
    made: list[ListenerSet] = []
    yield made
    for each in made:
        each.close()


def test_a_tcp_address_is_one_reuseport_socket_per_slot_and_unix_one_shared(
    sets: list[ListenerSet], tmp_path: Path
) -> None:
    """Two slots: a TCP address gets a socket each on one port; a Unix address one socket."""
    path = tmp_path / "echo.sock"
    held = ListenerSet.open(config(["127.0.0.1:0", f"unix:{path}"]), 2, passed=[])
    sets.append(held)
    first, second = held.slots
    assert first[0] is not second[0]
    assert first[0].sock.getsockname() == second[0].sock.getsockname()
    assert first[0].sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
    assert first[1] is second[1]
    assert first[1].shared
    assert len(held.unique()) == 3


def test_a_plan_that_cannot_bind_leaves_nothing_bound(sets: list[ListenerSet]) -> None:
    """A taken address fails the plan; what it had bound for other addresses is closed."""
    old = config(["127.0.0.1:0"], metrics="127.0.0.1:0")
    held = ListenerSet.open(old, 2, passed=[])
    sets.append(held)
    before = open_fds()
    with socket.socket() as holder:
        holder.bind(("127.0.0.2", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        new = config(["127.0.0.1:0", "127.0.0.3:0", f"127.0.0.2:{taken}"], "127.0.0.4:0")
        with pytest.raises(BindError, match="address already in use"):
            held.plan(old, new)
        assert open_fds() == before + 1  # the holder only
    assert [len(slot) for slot in held.slots] == [1, 1]


def test_commit_adds_per_slot_closes_removed_and_moves_metrics(sets: list[ListenerSet]) -> None:
    """A committed plan: the new address in every slot, the removed one closed, the
    metrics socket replaced; a plan not committed changes nothing held."""
    old = config(["127.0.0.1:0", "127.0.0.2:0"], metrics="127.0.0.1:0")
    held = ListenerSet.open(old, 2, passed=[])
    sets.append(held)
    removed = [slot[1] for slot in held.slots]
    old_metrics = held.metrics
    new = config(["127.0.0.1:0", "udp:127.0.0.3:0"], metrics="127.0.0.2:0")
    plan = held.plan(old, new)
    assert [s[1] for s in held.slots] == removed  # nothing applied yet
    held.commit(plan)
    assert all(x.sock.fileno() == -1 for x in removed)
    assert old_metrics is not None
    assert old_metrics.sock.fileno() == -1
    assert held.metrics is not None
    assert held.metrics.name.startswith("127.0.0.2:")
    added = [slot[-1] for slot in held.slots]
    assert [x.is_udp for x in added] == [True, True]
    assert added[0] is not added[1]
    assert added[0].sock.getsockname() == added[1].sock.getsockname()


def test_a_worker_set_takes_the_sockets_handed_down(sets: list[ListenerSet]) -> None:
    """A worker's set binds nothing: a new address takes the socket its supervisor sent,
    and one that was not sent fails the plan."""
    old = config(["127.0.0.1:0"])
    supervisor = ListenerSet.open(old, 2, passed=[])
    sets.append(supervisor)
    new = config(["127.0.0.1:0", "127.0.0.2:0"])
    plan = supervisor.plan(old, new)
    supervisor.commit(plan)
    mine = plan.added[1][0]
    handed = HandedDown()
    worker = ListenerSet([list(supervisor.slots[1][:1])])
    worker.take_from(handed)
    with pytest.raises(BindError, match="the supervisor sent no socket"):
        worker.plan(old, new)
    handed.put(from_record(describe(mine), os.dup(mine.fd)))
    worker_plan = worker.plan(old, new)
    assert worker_plan.metrics is None  # the supervisor's
    [[taken]] = worker_plan.added
    assert taken.sock.getsockname() == mine.sock.getsockname()
    assert taken.keep_path
    taken.sock.close()
