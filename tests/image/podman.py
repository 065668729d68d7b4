"""The image tests' harness: epolld's image built once per set of inputs, and podman run.

What works on these machines is in shared/NOTES.md; in short:

- The image is built by packaging/image/build-image and cached as an OCI archive in
  .cache/image/, keyed by the hash of everything the image is made of (the package's sources,
  debian/, packaging/): a warm run only loads it into podman's store (or finds it there).
  Editing a test does not rebuild it; editing epolld/ does.
- podman runs with tests/image/containers.conf (runc, rlimits this host can set).
- Containers are on podman's default bridge network; the test reaches them at their address
  from the host, as a Service would. (podman's firewall rules turn on connection tracking in
  the host's network namespace: see NOTES.md for large connection tests.)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[2]
CACHE_DIR = REPO / ".cache" / "image"
BUILD_SCRIPT = REPO / "packaging" / "image" / "build-image"
APT_INSTALL = REPO / "packaging" / "dev" / "apt-install"
EMULATION_SCRIPT = REPO / "packaging" / "image" / "emulation"
CONTAINERS_CONF = Path(__file__).resolve().parent / "containers.conf"
# What the image is made of: the package's sources and the build scripts (not tests or docs).
IMAGE_INPUTS = ("epolld", "debian", "etc", "packaging", "pyproject.toml", "README.md", "LICENSE")
HOST_ARCH = subprocess.run(
    ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
).stdout.strip()

BUILD_TIMEOUT_S = 1800.0  # a cold arm64 build under emulation, on a loaded machine
COMMAND_TIMEOUT_S = 120.0
ECHO_PORT = 7080
T = TypeVar("T")


def missing_privileges() -> str | None:
    """Why the image tests cannot run here, or None when they can (we are root)."""
    if os.geteuid() != 0:
        return "needs root: mmdebstrap, podman's networks and binfmt_misc require it"
    return None


def ensure_tools() -> None:
    """Install what the tests run besides the image build's own tools: podman with runc
    (containers.conf), catatonit (kube play builds its pause image with it), skopeo."""
    subprocess.run(
        [str(APT_INSTALL), "podman", "runc", "catatonit", "skopeo", "util-linux"],
        check=True,
        timeout=600,
    )


def podman(*args: str, timeout: float = COMMAND_TIMEOUT_S, check: bool = True) -> str:
    """Run podman with the tests' containers.conf; return its stdout."""
    result = subprocess.run(
        ["podman", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)},
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return result.stdout


def _inputs_key() -> str:
    """A hash of every file the image is built from (tracked or new, uncommitted edits too)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", *IMAGE_INPUTS],
        cwd=REPO,
        capture_output=True,
        check=False,
    )
    if listed.returncode == 0:
        names = sorted(n for n in listed.stdout.decode().split("\0") if n)
    else:  # an unpacked tarball
        names = sorted(
            str(p.relative_to(REPO))
            for top in IMAGE_INPUTS
            for p in ([REPO / top] if (REPO / top).is_file() else (REPO / top).rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts
        )
    digest = hashlib.sha256()
    for name in names:
        path = REPO / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def image(arch: str = HOST_ARCH) -> str:
    """The tag of epolld's image for arch in podman's store, built first when its inputs
    changed (the archive is cached in .cache/image/, older ones removed).

    A lock serialises concurrent builders (two test runs, or two test modules).
    """
    key = _inputs_key()
    tag = f"localhost/epolld:test-{key}-{arch}"
    archive = CACHE_DIR / f"epolld-{key}-{arch}.oci.tar"
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not archive.exists():
            partial = archive.with_suffix(".partial")
            result = subprocess.run(
                [str(BUILD_SCRIPT), "--arch", arch, "--output", str(partial), "--tag", tag],
                capture_output=True,
                text=True,
                timeout=BUILD_TIMEOUT_S,
                check=False,
            )
            assert result.returncode == 0, f"build-image failed:\n{result.stderr[-6000:]}"
            partial.rename(archive)
            for stale in CACHE_DIR.glob(f"epolld-*-{arch}.oci.tar"):
                if stale != archive:
                    stale.unlink()
        if not _exists(tag):
            podman("load", "--quiet", "--input", str(archive), timeout=300)
        for name in podman("images", "--format", "{{.Repository}}:{{.Tag}}").split():
            built_before = name.startswith("localhost/epolld:test-") and name != tag
            if built_before and name.endswith(f"-{arch}"):  # from older inputs
                podman("rmi", name, check=False)
    return tag


def _exists(tag: str) -> bool:
    result = subprocess.run(
        ["podman", "image", "exists", tag],
        env={**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)},
        timeout=COMMAND_TIMEOUT_S,
        check=False,
    )
    return result.returncode == 0


def wait_until(check: Callable[[], T | None], timeout: float, what: str) -> T:
    """Poll check() until it returns something other than None or False; return that."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None and result is not False:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


@contextlib.contextmanager
def emulation(arch: str) -> Iterator[None]:
    """Foreign binaries run through qemu-user-static while inside; the entry is disabled
    again afterwards (the host is left as it was)."""
    if arch == HOST_ARCH:
        yield
        return
    subprocess.run([str(EMULATION_SCRIPT), "on", arch], check=True, timeout=600)
    try:
        yield
    finally:
        subprocess.run([str(EMULATION_SCRIPT), "off", arch], check=True, timeout=60)


class Container:
    """One container (started by podman run or kube play), seen from the host.

    Args:
        name: podman's name (or ID) of the container.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    @classmethod
    def run(cls, tag: str, config_dir: Path, *args: str, name: str) -> Container:
        """podman run -d: read-only root, the configuration directory mounted at
        /etc/epolld (as a ConfigMap is), the image's own command and user."""
        podman("rm", "--force", "--ignore", name)
        podman(
            "run", "--detach", "--name", name, "--read-only",
            "--cap-drop", "all", "--security-opt", "no-new-privileges",
            "--volume", f"{config_dir}:/etc/epolld:ro", *args, tag,
        )  # fmt: skip
        return cls(name)

    def inspect(self, template: str) -> str:
        return podman("inspect", "--format", template, self.name).strip()

    @property
    def address(self) -> str:
        """The container's IP address on its network (the first one)."""
        addresses = self.inspect(
            "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}"
        ).split()
        assert addresses, f"{self.name} has no IP address"
        return addresses[0]

    @property
    def host_pid(self) -> int:
        """The host's PID of the container's PID 1."""
        return int(self.inspect("{{.State.Pid}}"))

    def logs(self) -> list[dict[str, Any]]:
        """Its stdout's JSON lines (anything else is left out)."""
        entries = []
        for line in podman("logs", self.name).splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict):
                    entries.append(entry)
        return entries

    def wait_for_log(self, event: str, timeout: float = 60.0, count: int = 1) -> dict[str, Any]:
        """The count-th log line named event, once it has appeared."""

        def found() -> dict[str, Any] | None:
            entries = [e for e in self.logs() if e.get("event") == event]
            if len(entries) >= count:
                return entries[count - 1]
            if self.inspect("{{.State.Status}}") == "exited":  # it will never come
                raise TimeoutError(f"{self.name} exited")
            return None

        try:
            return wait_until(found, timeout, f"{event} in {self.name}'s log")
        except TimeoutError as e:
            log = podman("logs", self.name)[-4000:]
            raise AssertionError(f"no {event} ({e}); log:\n{log}") from None

    def kill(self, signal_name: str) -> None:
        podman("kill", "--signal", signal_name, self.name)

    def exit_code(self, timeout: float = 60.0) -> int:
        """Wait for the container to stop; its exit code."""
        return int(podman("wait", self.name, timeout=timeout).strip())

    def exec(self, *command: str) -> str:
        return podman("exec", self.name, *command)

    def remove(self) -> None:
        podman("rm", "--force", "--ignore", "--time", "0", self.name)


def children_of(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def zombies_of(pid: int) -> list[int]:
    """pid's children that exited and were not reaped (state Z)."""
    zombies = []
    for child in children_of(pid):
        with contextlib.suppress(FileNotFoundError):
            if Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                zombies.append(child)
    return zombies


def connect(address: str, port: int = ECHO_PORT, timeout: float = 10.0) -> socket.socket:
    """A client connection to address:port, retried while the listener is not up yet."""
    return wait_until(
        lambda: _try_connect(address, port, timeout), 60.0, f"a connection to {address}:{port}"
    )


def _try_connect(address: str, port: int, timeout: float) -> socket.socket | None:
    try:
        return socket.create_connection((address, port), timeout=timeout)
    except OSError:
        return None


def round_trip(sock: socket.socket, data: bytes) -> bytes:
    """Send data and read back as many bytes."""
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def finish(sock: socket.socket) -> bytes:
    """Half-close, then read until the server's FIN: what was still on its way."""
    sock.shutdown(socket.SHUT_WR)
    got = b""
    while chunk := sock.recv(65536):
        got += chunk
    return got


def read_to_eof(sock: socket.socket) -> bytes:
    """Read until the server's FIN, without closing our side first."""
    got = b""
    while chunk := sock.recv(65536):
        got += chunk
    return got


def http_get(address: str, port: int, path: str, timeout: float = 5.0) -> tuple[int, str]:
    """GET path over HTTP/1.1 (Connection: close); the status code and the body."""
    with socket.create_connection((address, port), timeout=timeout) as sock:
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n".encode()
        )
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode(errors="replace")
