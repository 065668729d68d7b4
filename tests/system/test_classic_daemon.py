"""`epolld --daemon` on a Debian 12 host without systemd's help: python-daemon 2.3.2, logrotate.

The container provides Debian's own python3-daemon and logrotate; epolld runs from the
checkout (the epolld_container fixture) as a classic daemon started from a shell, not as a
unit. logrotate runs the snippet from epolld(8) verbatim, so the manual is what is tested.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from nspawn import REPO, Container, wait_until

from tests.traffic import echo_until_eof

pytestmark = pytest.mark.system

CONFIG = "/etc/epolld-classic.yaml"
LOG = "/var/log/epolld.log"  # the paths of the manual's logrotate snippet
PIDFILE = "/run/epolld.pid"
WAIT_S = 30.0
APT_TIMEOUT_S = 300.0

SETTINGS = f"""\
listen:
  - "127.0.0.1:0"
logging:
  format: json
daemon:
  pidfile: {PIDFILE}
  log_file: {LOG}
"""


def logrotate_snippet() -> str:
    """The /etc/logrotate.d/epolld example of epolld(8), as plain text."""
    page = (REPO / "packaging" / "man" / "epolld.8").read_text()
    match = re.search(r"^\.EX\n(/var/log/epolld\.log \{\n.*?^\})\n\.EE$", page, re.M | re.S)
    assert match, "epolld(8) has no logrotate example for /var/log/epolld.log"
    text = match.group(1).replace("\\-", "-")
    assert "\\" not in text, "an unhandled roff escape in the example"
    return text + "\n"


def events(c: Container, path: str) -> list[dict[str, Any]]:
    """The JSON entries of a log file in the container (none if it does not exist)."""
    result = c.run("cat", path, check=False)
    lines = result.stdout.splitlines() if result.returncode == 0 else []
    return [json.loads(line) for line in lines]


def logged(c: Container, path: str, event: str, count: int = 1) -> list[dict[str, Any]]:
    """Wait until the log file holds count entries named event; return them."""

    def found() -> list[dict[str, Any]] | None:
        entries = [e for e in events(c, path) if e["event"] == event]
        return entries if len(entries) >= count else None

    return wait_until(found, WAIT_S, f"{count}x {event} in {path}")


def daemon_pid(c: Container) -> int:
    """The PID (in the container) that the pidfile names, once it holds a complete line."""

    def written() -> int | None:
        text = c.run("cat", PIDFILE, check=False).stdout
        return int(text) if text.endswith("\n") else None

    return wait_until(written, WAIT_S, f"{PIDFILE} to hold a PID")


def start_daemon(c: Container) -> None:
    """Run `epolld --daemon` from a shell; the foreground must return 0 once detached."""
    result = c.run("epolld", "--daemon", "--config", CONFIG, check=False)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def signal_daemon(c: Container, name: str) -> None:
    c.sh(f'kill -{name} "$(cat {PIDFILE})"')


@pytest.fixture
def c(epolld_container: Container) -> Iterator[Container]:
    """The container with logrotate installed and the manual's snippet in /etc/logrotate.d."""
    container = epolld_container
    if container.run("sh", "-c", "command -v logrotate", check=False).returncode != 0:
        for args in (["update"], ["install", "--no-install-recommends", "logrotate"]):
            container.run(
                "env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "-y", "-q", *args,
                timeout=APT_TIMEOUT_S, host_network=True,
            )  # fmt: skip
    container.write_file("/etc/logrotate.d/epolld", logrotate_snippet())
    container.write_file(CONFIG, SETTINGS)
    container.sh(f"rm -f {LOG} {LOG}.* {PIDFILE}")
    with container.network():
        yield container
    container.sh(f'[ ! -s {PIDFILE} ] || kill -KILL "$(cat {PIDFILE})"', check=False)


def test_logrotate_moves_the_log_and_the_daemon_follows(c: Container) -> None:
    """Debian's logrotate with the manual's snippet: old lines in .1, new ones in a new file."""
    start_daemon(c)
    pid = daemon_pid(c)
    port = int(logged(c, LOG, "listening")[0]["address"].rpartition(":")[2])
    signal_daemon(c, "USR1")
    logged(c, LOG, "stats")

    c.run("logrotate", "--force", "/etc/logrotate.d/epolld")

    (reopened,) = logged(c, f"{LOG}", "log_reopened")
    assert reopened["log_file"] == LOG
    signal_daemon(c, "USR1")
    logged(c, LOG, "stats")
    old = [e["event"] for e in events(c, f"{LOG}.1")]
    new = [e["event"] for e in events(c, LOG)]
    assert old[-1] == "stats", old
    assert old.count("stats") == 1, old
    assert new == ["log_reopened", "config_reloaded", "stats"]
    # delaycompress: the file the daemon wrote until the signal stays readable as it was.
    assert c.run("test", "-e", f"{LOG}.1.gz", check=False).returncode != 0
    open_files = c.sh(f"ls -l /proc/{pid}/fd").stdout
    assert f"{LOG}.1" not in open_files
    assert LOG in open_files
    assert echo_until_eof(port, b"rotated\n") == b"rotated\n"


def test_killed_daemon_leaves_a_stale_pidfile_that_is_replaced(c: Container) -> None:
    """After SIGKILL the pidfile stays behind; the next start logs why it is stale and runs."""
    start_daemon(c)
    killed = daemon_pid(c)
    logged(c, LOG, "listening")
    signal_daemon(c, "KILL")
    wait_until(
        lambda: c.run("test", "-d", f"/proc/{killed}", check=False).returncode != 0,
        WAIT_S,
        "the killed daemon to be gone",
    )

    start_daemon(c)
    (warning,) = logged(c, LOG, "pidfile_stale_replaced")
    assert warning["reason"] == f"PID {killed} no longer runs"
    pid = daemon_pid(c)
    assert pid != killed

    second = c.run("epolld", "--daemon", "--config", CONFIG, check=False)
    assert second.returncode == 71
    assert second.stderr == f"Error: already running as PID {pid} (pidfile {PIDFILE})\n"

    signal_daemon(c, "TERM")
    wait_until(
        lambda: c.run("test", "-e", PIDFILE, check=False).returncode != 0,
        WAIT_S,
        "the pidfile to be removed on exit",
    )
    logged(c, LOG, "shutdown_complete")
