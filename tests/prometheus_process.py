"""A real Prometheus (Debian 12's 2.42) as a subprocess, scraping targets on loopback.

Installed with packaging/dev/apt-install when missing (root only: tests skip otherwise).
It listens on 127.0.0.1 port 0 and the port the kernel gave it is read from the process's
own listening socket (/proc/PID/fd and /proc/net/tcp), so no port is guessed and none can be
taken by someone else between choosing and binding. Its storage is a temporary directory.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import time
import urllib.parse
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
APT_INSTALL = REPO / "packaging" / "dev" / "apt-install"
PROMETHEUS = "/usr/bin/prometheus"
WAIT_S = 30.0
TCP_LISTEN = "0A"  # the state column of /proc/net/tcp for LISTEN


def ensure_installed() -> str | None:
    """Install Debian's prometheus if needed; None when ready, else why it cannot be."""
    if os.path.exists(PROMETHEUS):
        return None
    if os.geteuid() != 0:
        return "needs root to install Debian's prometheus package (packaging/dev/apt-install)"
    subprocess.run([str(APT_INSTALL), "prometheus"], check=True, timeout=600)
    return None


def _listening_ports(pid: int) -> set[int]:
    """TCP ports the process listens on over IPv4 loopback, from its socket inodes."""
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in os.listdir(fd_dir):
        with contextlib.suppress(OSError):
            target = os.readlink(fd_dir / fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = set()
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state, inode = fields[1], fields[3], fields[9]
        if state == TCP_LISTEN and inode in inodes and local.startswith("0100007F:"):
            ports.add(int(local.split(":")[1], 16))
    return ports


class Prometheus:
    """A Prometheus server scraping targets every second, with its HTTP API on loopback.

    Args:
        tmp: a directory of its own (config, storage, log).
        targets: "127.0.0.1:PORT" addresses of one job, "epolld".
    """

    def __init__(self, tmp: Path, targets: list[str]) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "evaluation_interval": "1s",
            },
            "scrape_configs": [{"job_name": "epolld", "static_configs": [{"targets": targets}]}],
        }
        config_path = tmp / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        self.log_path = tmp / "prometheus.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={tmp / 'data'}",
                "--web.listen-address=127.0.0.1:0",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            self.port = self._wait_for_port()
            self._wait_ready()
        except BaseException:
            self.stop()  # the caller never gets an object to stop: do not leave it running
            raise

    def _wait_for_port(self) -> int:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited {self.proc.returncode}:\n{self.log()}")
            ports = _listening_ports(self.proc.pid)
            if ports:
                return min(ports)
            time.sleep(0.1)
        raise AssertionError(f"prometheus did not listen within {WAIT_S} s:\n{self.log()}")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            try:
                if self._get("/-/ready")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"prometheus not ready within {WAIT_S} s:\n{self.log()}")

    def _get(self, target: str) -> tuple[int, bytes]:
        # http.client, not urllib: no proxy from the environment is ever consulted.
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", target)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; the "data" of a successful answer."""
        status, body = self._get(f"/api/v1/{path}?{urllib.parse.urlencode(params)}")
        answer = json.loads(body)
        assert status == 200, answer
        assert answer["status"] == "success", answer
        return answer["data"]

    def value(self, query: str) -> float | None:
        """The instant value of a query that yields one series, or None if it yields none."""
        result = self.api("query", query=query)["result"]
        if not result:
            return None
        assert len(result) == 1, result
        return float(result[0]["value"][1])

    def wait_for_value(self, query: str, expected: float, timeout: float = WAIT_S) -> None:
        """Poll the query until it equals expected (scrapes are every second)."""
        deadline = time.monotonic() + timeout
        seen: float | None = None
        while time.monotonic() < deadline:
            seen = self.value(query)
            if seen == expected:
                return
            time.sleep(0.25)
        targets = json.dumps(self.api("targets")["activeTargets"], indent=1)[:2000]
        raise AssertionError(f"{query} = {seen}, expected {expected}; targets: {targets}")

    def stop(self) -> None:
        """SIGTERM the process group it runs in, SIGKILL if it lingers; close the log."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(WAIT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(WAIT_S)
        self._log.close()
