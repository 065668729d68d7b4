"""workers: 2 and SIGHUP: `listen` and `metrics.listen` apply to every live worker, as
they do for one process (issue 19, bug 2)."""

from __future__ import annotations

import signal
import socket
from typing import Any

import pytest
import yaml

from tests.epolld_process import WAIT_S
from tests.test_metrics_endpoint import get, metrics_port, scrape
from tests.test_workers import Workers
from tests.test_workers import start_workers as start_workers
from tests.traffic import connect, roundtrip

SUPERVISOR: dict[str, Any] = {"worker": None}  # a worker's lines name it


def _rewrite(w: Workers, **changes: object) -> None:
    settings = yaml.safe_load(w.daemon.config_path.read_text())
    settings.update(changes)
    w.daemon.config_path.write_text(yaml.safe_dump(settings))


def _reload(w: Workers, event: str = "workers_reloaded") -> dict[str, Any]:
    before = len(w.daemon.wait_for(event, count=0, **SUPERVISOR))
    w.daemon.signal(signal.SIGHUP)
    return w.daemon.wait_for(event, count=before + 1, **SUPERVISOR)[-1]


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def _bound(w: Workers, prefix: str) -> list[dict[str, Any]]:
    """The workers' listening lines for addresses starting with prefix."""
    return [e for e in w.daemon.events("listening") if e["address"].startswith(prefix)]


def _until_both(w: Workers, port: int, host: str, tries: int = 400) -> list[socket.socket]:
    """Connections to host:port until each worker holds one (open, echoed once)."""
    held: dict[int, socket.socket] = {}
    for _ in range(tries):
        after = w.opened()
        sock = connect(port, host=host)
        roundtrip(sock, b"x")
        index = w.worker_of(sock, after)
        if index in held:
            sock.close()
        else:
            held[index] = sock
        if len(held) == 2:
            break
    assert sorted(held) == [1, 2]
    return list(held.values())


def test_added_addresses_are_served_by_every_worker(start_workers: Any) -> None:
    """An added TCP address is accepted on by both live workers (same pids), and an
    added UDP address echoes."""
    w = start_workers(2)
    pids = w.pids()
    _rewrite(w, listen=["127.0.0.1:0", "127.0.0.2:0", "udp:127.0.0.3:0"])
    _reload(w)
    tcp = w.daemon.wait_for("listening", count=2, address=_bound(w, "127.0.0.2:")[0]["address"])
    assert {e["worker"] for e in tcp} == {1, 2}
    for sock in _until_both(w, _port(tcp[0]["address"]), "127.0.0.2"):
        sock.close()
    udp = w.daemon.wait_for("listening", count=2, address=_bound(w, "udp:")[0]["address"])
    assert {e["worker"] for e in udp} == {1, 2}
    for i in range(20):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(WAIT_S)
            sock.sendto(b"datagram %d" % i, ("127.0.0.3", _port(udp[0]["address"])))
            assert sock.recv(100) == b"datagram %d" % i
    assert w.pids() == pids  # applied by the workers that serve, none replaced
    with connect(w.daemon.port) as sock:
        roundtrip(sock, b"the first address stays")


def test_removed_address_refuses_and_keeps_its_connections(start_workers: Any) -> None:
    """A removed address refuses new connections in every worker; the connections each
    worker accepted on it keep echoing."""
    w = start_workers(2, {"listen": ["127.0.0.1:0", "127.0.0.2:0"]})
    second = w.daemon.wait_for("listening", count=4)
    port = _port(next(e["address"] for e in second if e["address"].startswith("127.0.0.2:")))
    held = _until_both(w, port, "127.0.0.2")
    try:
        _rewrite(w, listen=["127.0.0.1:0"])
        _reload(w)
        for index in (1, 2):  # each worker closes its own socket
            w.daemon.wait_for("listener_closed", worker=index)
        assert w.daemon.wait_for("listener_closed", **SUPERVISOR)[0]["sockets"] == 2
        with pytest.raises(ConnectionRefusedError):
            connect(port, host="127.0.0.2").close()
        for sock in held:
            roundtrip(sock, b"still echoing")
        with connect(w.daemon.port) as sock:
            roundtrip(sock, b"the other address serves")
    finally:
        for sock in held:
            sock.close()


def test_moved_metrics_listen_applies(start_workers: Any) -> None:
    """A moved metrics.listen: the supervisor serves /metrics on the new address, and the
    old one refuses."""
    w = start_workers(2, {"metrics": {"listen": "127.0.0.1:0"}})
    old = metrics_port(w.daemon)
    _rewrite(w, metrics={"listen": "127.0.0.2:0"})
    _reload(w)
    moved = w.daemon.wait_for("metrics_listening", count=2, **SUPERVISOR)[-1]["address"]
    assert moved.startswith("127.0.0.2:")
    assert ("epolld_connections", ()) in scrape(_port(moved), "127.0.0.2")
    with pytest.raises(ConnectionRefusedError):
        get(old)


def test_reload_that_cannot_bind_changes_nothing(start_workers: Any) -> None:
    """A new address that cannot be bound fails the reload as a whole: no worker reloads
    or binds, the old address serves, the workers stay."""
    w = start_workers(2, {"metrics": {"listen": "127.0.0.1:0"}})
    pids = w.pids()
    with socket.socket() as holder:
        holder.bind(("127.0.0.2", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        _rewrite(
            w,
            listen=["127.0.0.1:0", "127.0.0.3:0", f"127.0.0.2:{taken}"],
            metrics={"listen": "127.0.0.4:0"},
        )
        failed = _reload(w, "config_reload_failed")
    assert f"127.0.0.2:{taken}: address already in use" in failed["error"]
    w.stats()  # a round trip through every worker after the reload was handled
    assert not w.daemon.events("config_reloaded")
    assert len(w.daemon.events("listening")) == 2  # the first address, once per worker
    assert len(w.daemon.events("metrics_listening")) == 1
    with pytest.raises(ConnectionRefusedError):
        connect(_port(w.daemon.addresses[0]), host="127.0.0.3").close()
    with connect(w.daemon.port) as sock:
        roundtrip(sock, b"old config")
    assert w.pids() == pids


def test_changing_workers_still_needs_a_stop_and_start(start_workers: Any) -> None:
    """Only the number of workers cannot change on reload: it says stop and start."""
    w = start_workers(2)
    _rewrite(w, workers=3, listen=["127.0.0.1:0", "127.0.0.2:0"])
    failed = _reload(w, "config_reload_failed")
    assert failed["error"] == "workers: cannot change on reload with workers; stop and start epolld"
    assert not _bound(w, "127.0.0.2:")
