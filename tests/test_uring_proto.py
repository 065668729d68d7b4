"""The io_uring echo prototype of issue 25 (bench/uring_proto/) echoes byte-exact and only
needs what Debian 12's kernel (6.1) offers."""

from __future__ import annotations

import errno
import importlib.util
import json
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.traffic import connect, pump

PROTO = Path(__file__).resolve().parent.parent / "bench" / "uring_proto"


def _load_ring() -> ModuleType:
    spec = importlib.util.spec_from_file_location("uring_proto_ring", PROTO / "ring.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ring = _load_ring()


@pytest.fixture(scope="module")
def io_uring_allowed() -> None:
    """Skip when io_uring_setup itself is refused (seccomp, kernel.io_uring_disabled)."""
    try:
        ring.Ring(8).close()
    except OSError as e:
        if e.errno in (errno.EPERM, errno.ENOSYS):
            pytest.skip(f"io_uring_setup refused here ({errno.errorcode[e.errno]}): {e}")
        raise


@pytest.fixture
def proto(request: pytest.FixtureRequest, io_uring_allowed: None) -> Iterator[dict[str, Any]]:
    """The prototype on 127.0.0.1:0 (extra arguments from the test's parameter); yields its
    listening event plus its proc; stopped with SIGTERM by its pid."""
    args = getattr(request, "param", [])
    proc = subprocess.Popen(
        [sys.executable, str(PROTO / "echo.py"), "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            _, err = proc.communicate(timeout=10)
            pytest.fail(f"the prototype did not start: {err.decode(errors='replace')[-800:]}")
        event = json.loads(line)
        event["port"] = int(event["address"].rsplit(":", 1)[1])
        event["proc"] = proc
        yield event
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def stop(proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    """SIGTERM the prototype and return its stats line."""
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err.decode(errors="replace")[-800:]
    stats: dict[str, Any] = json.loads(out.decode().splitlines()[-1])
    return stats


@pytest.mark.parametrize(
    "proto",
    [[], ["--buffers", "16", "--buffer-size", "4096"]],
    ids=["default-buffers", "16-buffers"],
    indirect=True,
)
def test_random_mebibyte_over_8_connections(proto: dict[str, Any]) -> None:
    """1 MiB of random bytes over 8 concurrent connections comes back byte-exact, then EOF."""
    rng = random.Random(25)
    data = rng.randbytes(1 << 20)
    parts = [data[i : i + (1 << 17)] for i in range(0, len(data), 1 << 17)]
    socks = [connect(proto["port"]) for _ in parts]
    try:
        got = pump(list(zip(socks, parts, strict=True)), chunk=rng.choice([1000, 65536]),
                   shut_write=True)  # fmt: skip
    finally:
        for sock in socks:
            sock.close()
    assert b"".join(got) == data
    stats = stop(proto["proc"])
    assert stats["cqes"] >= stats["enters"] > 0
    if proto["proc"].args[-1] == "4096":  # 16 buffers of 4 KiB run out: recv re-armed
        assert stats["enobufs"] > 0


def test_uses_only_what_linux_6_1_offers(proto: dict[str, Any]) -> None:
    """Every io_uring feature the prototype uses appeared in Linux 6.1 or earlier, it sets
    no setup flag beyond SINGLE_ISSUER and DEFER_TASKRUN, and its probe passed here."""
    assert max(ring.FEATURES.values()) <= (6, 1)
    assert ring.SETUP_FLAGS == ring.SETUP_SINGLE_ISSUER | ring.SETUP_DEFER_TASKRUN
    assert not ring.SETUP_FLAGS & (1 << 16)  # IORING_SETUP_NO_SQARRAY, 6.6
    uses = proto["io_uring"]["uses"]
    assert uses == {name: f"{v[0]}.{v[1]}" for name, v in ring.FEATURES.items()}


@pytest.mark.parametrize("proto", [["--sndbuf", "4096"]], ids=["sndbuf-4k"], indirect=True)
def test_short_sends_resume_where_they_stopped(proto: dict[str, Any]) -> None:
    """A slow reader behind small socket buffers gets short sends from the prototype, and each
    one's remainder is sent from where it stopped: 256 KiB per connection come back exact."""
    rng = random.Random(26)
    payloads = [rng.randbytes(1 << 18) for _ in range(2)]
    got = [bytearray() for _ in payloads]

    def client(i: int) -> None:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(20)
            sock.connect(("127.0.0.1", proto["port"]))
            writer = threading.Thread(target=sock.sendall, args=(payloads[i],))
            writer.start()
            deadline = time.monotonic() + 30
            while len(got[i]) < len(payloads[i]) and time.monotonic() < deadline:
                time.sleep(0.001)  # read slowly, so that the server's sends fill its buffer
                chunk = sock.recv(4096)
                if not chunk:
                    break
                got[i] += chunk
            writer.join(20)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(payloads))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(40)
    assert [bytes(g) for g in got] == payloads
    assert stop(proto["proc"])["short_sends"] > 0
