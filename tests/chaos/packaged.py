"""epolld installed from its Debian package in a real systemd 252 (tests/system/nspawn.py).

`PackagedService` builds the package of this checkout once, boots a container, installs the
package as an operator would, and offers what the container scenarios do to it: configure,
restart or upgrade and wait until the next process serves with an empty file descriptor
store, read its journal events, its memory, and run a process in its network namespace.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SYSTEM_TESTS = Path(__file__).resolve().parents[1] / "system"
if str(SYSTEM_TESTS) not in sys.path:
    sys.path.insert(0, str(SYSTEM_TESTS))

from debs import build_deb, repack_with_version  # noqa: E402
from nspawn import Container, missing_privileges, wait_until  # noqa: E402

from tests.chaos.netns import REPO  # noqa: E402

__all__ = ["PackagedService", "missing_privileges", "wait_until"]

GUEST_DEBS = "/tmp/debs"
APT_TIMEOUT_S = 300.0
SETTLE_S = 30.0  # the most a restart may take until the store is empty again
JOURNALD_UNITS = (
    "systemd-journald.socket",
    "systemd-journald-dev-log.socket",
    "systemd-journald-audit.socket",
    "systemd-journald.service",
)


@functools.cache
def _package() -> Path:
    """The package of this checkout, built once per campaign."""
    out = Path(tempfile.mkdtemp(prefix="epolld-chaos-deb-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    return build_deb(out)


class PackagedService:
    """The installed package in a booted container (a context manager that powers it off)."""

    def __init__(
        self, workdir: Path, name: str, upgrades: int = 0, package: Path | None = None
    ) -> None:
        current = package or _package()
        self.newer = [
            repack_with_version(current, f"0.1.0+chaos{k}", workdir) for k in range(1, upgrades + 1)
        ]
        self.c = Container(name=name).start()
        self.upgrades = 0
        try:
            for deb in [current, *self.newer]:
                self.c.copy_in(deb, f"{GUEST_DEBS}/{deb.name}", 0o644)
            # The root file system holds every dependency: dpkg needs no mirror.
            self.c.run(
                "env", "DEBIAN_FRONTEND=noninteractive",
                "dpkg", "-i", f"{GUEST_DEBS}/{current.name}",
                timeout=APT_TIMEOUT_S,
            )  # fmt: skip
        except BaseException:
            self.c.stop()
            raise

    def __enter__(self) -> PackagedService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.c.stop()

    def configure(self, text: str) -> None:
        """A new /etc/epolld.yaml, applied by a stop and a start (a restart keeps the worker
        count)."""
        self.c.write_file("/etc/epolld.yaml", text)
        self.c.systemctl("stop", "epolld")
        self.c.systemctl("start", "epolld")
        self.c.wait_for_state("epolld", ["active"])

    def events(self, event: str) -> int:
        """How many entries of event the service's journal holds."""
        return len(self.c.journal("-u", "epolld", f"EPOLLD_EVENT={event}"))

    def main_pid(self) -> str:
        return self.c.show("epolld", "MainPID")

    def store_size(self) -> int:
        return int(self.c.show("epolld", "NFileDescriptorStore") or 0)

    def restart(self) -> str | None:
        """`systemctl restart`; None once the next process serves, else what went wrong."""
        return self._through(["systemctl", "restart", "epolld"])

    def upgrade(self) -> str | None:
        """dpkg -i of the next rebuilt version (its postinst restarts the service)."""
        deb = self.newer[self.upgrades]
        self.upgrades += 1
        return self._through(
            ["env", "DEBIAN_FRONTEND=noninteractive", "dpkg", "-i", f"{GUEST_DEBS}/{deb.name}"]
        )

    def _through(self, action: list[str]) -> str | None:
        before_pid = self.main_pid()
        before = self.events("handoff_complete")
        self.c.run(*action, timeout=APT_TIMEOUT_S)

        def settled() -> bool:
            return (
                self.c.show("epolld", "ActiveState") == "active"
                and self.main_pid() not in ("0", before_pid)
                and self.events("handoff_complete") > before
                and self.store_size() == 0
            )

        try:
            wait_until(settled, SETTLE_S, "the service to settle")
        except TimeoutError:
            return f"not settled within {SETTLE_S:g} s (store holds {self.store_size()})"
        return None

    def rss(self) -> int:
        """Resident memory of the service's processes (the main one and its workers), in bytes."""
        main = self.main_pid()
        out = self.c.sh(f"ps -o rss= -p {main}; ps -o rss= --ppid {main}", check=False).stdout
        return sum(int(v) for v in out.split()) * 1024

    def error_entries(self) -> int:
        entries = self.c.journal("-u", "epolld", "-p", "err")
        return sum(1 for e in entries if e.get("SYSLOG_IDENTIFIER") == "epolld")

    def warnings(self) -> dict[str, int]:
        """epolld's warnings and errors so far, counted by event (what a failed scenario
        reports before its container, and the journal with it, is gone)."""
        counts: dict[str, int] = {}
        for e in self.c.journal("-u", "epolld", "-p", "warning"):
            if e.get("SYSLOG_IDENTIFIER") == "epolld":
                event = str(e.get("EPOLLD_EVENT") or e.get("MESSAGE", "")[:60])
                counts[event] = counts.get(event, 0) + 1
        return counts

    def stop_journald(self) -> None:
        self.c.systemctl("stop", *JOURNALD_UNITS)

    def start_journald(self) -> None:
        self.c.systemctl("start", *JOURNALD_UNITS, check=False)

    def spawn(self, *argv: str) -> subprocess.Popen[str]:
        """A host process (this checkout's Python) in the container's network namespace."""
        return subprocess.Popen(
            ["nsenter", f"--net=/proc/{self.c.leader}/ns/net", *argv],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        )  # fmt: skip

    def probe(self, port: int, seconds: float, conns: int = 5) -> subprocess.Popen[str]:
        return self.spawn(
            sys.executable, "-m", "tests.chaos.probe", "127.0.0.1", str(port),
            f"--conns={conns}", f"--seconds={seconds}",
        )  # fmt: skip
