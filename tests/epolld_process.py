"""The daemon as a real subprocess: start it, read its JSON log, signal it, stop it."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

WAIT_S = 10.0  # the most any single wait in these tests may take


class Daemon:
    """A running `python -m epolld` in its own session, with its log parsed as it comes."""

    def __init__(
        self,
        config_path: Path,
        *,
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        nofile: int | None = None,
        prefix: tuple[str, ...] = (),
        pass_fds: tuple[int, ...] = (),
    ) -> None:
        self.config_path = config_path
        self.logs: list[dict[str, Any]] = []
        self.bad_lines: list[str] = []
        self._cond = threading.Condition()
        preexec: Callable[[], None] | None = None
        if nofile is not None:

            def preexec() -> None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.proc = subprocess.Popen(
            [
                *prefix,  # e.g. ("ip", "netns", "exec", NAME), which execs: the PID stays
                sys.executable,
                "-m",
                "epolld",
                "--config",
                str(config_path),
                "--log-format",
                "json",
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            env=env,
            preexec_fn=preexec,
            pass_fds=pass_fds,
        )
        self.pid = self.proc.pid
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                entry = json.loads(line)
            except ValueError:
                entry = None
            with self._cond:
                if isinstance(entry, dict):
                    self.logs.append(entry)
                else:
                    self.bad_lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(
        self, event: str, count: int = 1, timeout: float = WAIT_S, **fields: Any
    ) -> list[dict[str, Any]]:
        """Wait until `count` log entries named event (with these fields) have appeared."""

        def matching() -> list[dict[str, Any]]:
            return [
                e
                for e in self.logs
                if e.get("event") == event and all(e.get(k) == v for k, v in fields.items())
            ]

        deadline = time.monotonic() + timeout
        with self._cond:
            while len(found := matching()) < count:
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"no {count}x {event} {fields} in log:\n{self.tail()}")
                self._cond.wait(min(left, 0.1))
            return found

    def events(self, event: str) -> list[dict[str, Any]]:
        with self._cond:
            return [e for e in self.logs if e.get("event") == event]

    def tail(self, n: int = 20) -> str:
        return "\n".join(json.dumps(e) for e in self.logs[-n:])

    @property
    def addresses(self) -> list[str]:
        return [e["address"] for e in self.wait_for("listening")]

    @property
    def port(self) -> int:
        """The port of the first TCP listener (the config asks for port 0)."""
        address = next(a for a in self.addresses if not a.startswith("unix:"))
        return int(address.rsplit(":", 1)[1])

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait(self, timeout: float = WAIT_S) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(timeout)
        return code

    def cpu_seconds(self) -> float:
        """utime + stime of the daemon so far, from /proc/PID/stat."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_bytes(self, field: str = "VmRSS") -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise AssertionError(f"no {field} in /proc/{self.pid}/status")

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def stop(self) -> None:
        """End the daemon's whole session (teardown), then close the pipes."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
        self.proc.wait(WAIT_S)
        self._reader.join(WAIT_S)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def write_config(path: Path, settings: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path
