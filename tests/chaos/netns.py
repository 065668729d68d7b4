"""Network namespaces the campaign makes for itself, and the links between them.

`Namespaces` creates a server namespace and the client namespaces around it and removes them
all when it ends. A client namespace reaches the server either over a bad link (a TUN device
in each, `tests/chaos/relay.py` between them, applying loss, delay, reordering and
duplication) or over a clean veth pair. Traffic never leaves these namespaces.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from tests.chaos.relay import enter_netns

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RELAY_START_S = 10.0


def missing_privileges() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces and TUN devices need root"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun on this machine"
    return None


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass(frozen=True)
class Faults:
    loss: float = 0.05
    delay_ms: float = 50.0
    jitter_ms: float = 20.0
    duplicate: float = 0.01

    def describe(self) -> str:
        return (
            f"{self.loss:.0%} loss, {self.delay_ms:.0f}±{self.jitter_ms:.0f} ms delay (reordering),"
            f" {self.duplicate:.0%} duplication"
        )


class Namespaces:
    """A server namespace `<tag>-s` and client namespaces linked to it (a context manager)."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.server = f"{tag}-s"
        self._made: list[str] = []
        self._relays: list[subprocess.Popen[str]] = []
        self.relay_counts: list[dict[str, int]] = []
        self._subnet = 0

    def __enter__(self) -> Namespaces:
        self._add(self.server)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _add(self, name: str) -> None:
        ip("netns", "add", name)
        self._made.append(name)
        ip("-n", name, "link", "set", "lo", "up")

    def _next_subnet(self) -> int:
        self._subnet += 1
        return self._subnet

    def bad_link(self, faults: Faults, seed: int = 0) -> tuple[str, str]:
        """A new client namespace behind a bad link; returns (its name, the server's address)."""
        n = self._next_subnet()
        client = f"{self.tag}-c{n}"
        self._add(client)
        dev_c, dev_s = f"chaos{n}c", f"chaos{n}s"
        relay = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.chaos.relay",
                client,
                dev_c,
                self.server,
                dev_s,
                f"--loss={faults.loss}",
                f"--delay-ms={faults.delay_ms}",
                f"--jitter-ms={faults.jitter_ms}",
                f"--duplicate={faults.duplicate}",
                f"--seed={seed}",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        self._relays.append(relay)
        assert relay.stdout is not None
        ready = _readline(relay, RELAY_START_S)
        if ready != "ready":
            raise RuntimeError(f"the relay did not start: {ready!r}")
        client_addr, server_addr = f"10.77.{n}.1", f"10.77.{n}.2"
        for ns, dev, addr in ((client, dev_c, client_addr), (self.server, dev_s, server_addr)):
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
        return client, server_addr

    def clean_link(self) -> tuple[str, str]:
        """A new client namespace on a veth pair; returns (its name, the server's address)."""
        n = self._next_subnet()
        client = f"{self.tag}-c{n}"
        self._add(client)
        dev_c, dev_s = f"chaos{n}c", f"chaos{n}s"
        ip(
            "link",
            "add",
            dev_c,
            "netns",
            client,
            "type",
            "veth",
            "peer",
            dev_s,
            "netns",
            self.server,
        )
        client_addr, server_addr = f"10.77.{n}.1", f"10.77.{n}.2"
        for ns, dev, addr in ((client, dev_c, client_addr), (self.server, dev_s, server_addr)):
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
        return client, server_addr

    def route_default(self, name: str, via: str) -> None:
        ip("-n", name, "route", "add", "default", "via", via)

    def exec_prefix(self, name: str) -> tuple[str, ...]:
        return ("ip", "netns", "exec", name)

    def sysctl(self, name: str, key: str, value: str) -> None:
        subprocess.run(
            [*self.exec_prefix(name), "sysctl", "-q", "-w", f"{key}={value}"],
            check=True,
            capture_output=True,
        )

    def close(self) -> None:
        for relay in self._relays:
            if relay.poll() is None:
                relay.terminate()
            try:
                out, _ = relay.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                relay.kill()
                out, _ = relay.communicate()
            with contextlib.suppress(ValueError, IndexError):
                self.relay_counts.append(json.loads(out.strip().splitlines()[-1]))
        self._relays.clear()
        for name in reversed(self._made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self._made.clear()


def _readline(proc: subprocess.Popen[str], timeout: float) -> str:
    line: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        line.append(proc.stdout.readline().strip())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    return line[0] if line else ""


@contextlib.contextmanager
def inside(name: str) -> Iterator[None]:
    """Runs the block with the calling thread in namespace `name` (its sockets stay there)."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        enter_netns(name)
        yield
    finally:
        if ctypes.CDLL(None, use_errno=True).setns(home, 0x40000000) != 0:
            raise OSError(ctypes.get_errno(), "could not return to the original network namespace")
        os.close(home)
