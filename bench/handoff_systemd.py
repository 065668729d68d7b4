#!/usr/bin/env python3
"""The restart handoff under a real systemd 252 (in a container): N connections through
`systemctl restart`, each step's time from the new process's handoff_complete entry.

    .venv/bin/python bench/handoff_systemd.py --conns 10000 --restarts 2     # as root, ~1 min

The container runs this checkout (as tests/system do: the packaged unit, Debian's python3);
the clients live in its network namespace. After each restart every connection must echo
one more byte, or the run fails. bench/run's handoff workloads measure the re-exec path
on the host; this one measures the fd store path.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests" / "system"), str(REPO)]

from conftest import GUEST_REPO, install_checkout  # noqa: E402
from nspawn import Container, wait_until  # noqa: E402

CONFIG = """\
listen: ["127.0.0.1:7080"]
limits: {max_connections: 20000, idle_timeout: 0}
logging: {connections: false}
"""


def handoffs(c: Container) -> list[dict[str, str]]:
    return c.journal("-u", "epolld", "EPOLLD_EVENT=handoff_complete")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conns", type=int, default=10_000)
    parser.add_argument("--restarts", type=int, default=2)
    opts = parser.parse_args()
    with Container(binds_ro={REPO: GUEST_REPO}) as c:
        install_checkout(c)
        c.write_file("/etc/epolld.yaml", CONFIG)
        c.systemctl("start", "epolld")
        c.wait_for_state("epolld", ["active"], 30)
        with c.network():
            socks = []
            for _ in range(opts.conns):
                sock = socket.create_connection(("127.0.0.1", 7080), timeout=30)
                sock.sendall(b"x")
                assert sock.recv(1) == b"x"
                socks.append(sock)
            for _ in range(opts.restarts):
                before = len(handoffs(c))
                started = time.monotonic()
                c.systemctl("restart", "epolld")
                restart_s = time.monotonic() - started
                entry = wait_until(lambda before=before: handoffs(c)[before:] or None, 60, "it")[0]
                for sock in socks:
                    sock.sendall(b"y")
                for sock in socks:
                    assert sock.recv(1) == b"y"
                all_echoing_s = time.monotonic() - started
                print(
                    json.dumps(
                        {
                            "connections": int(entry["EPOLLD_CONNECTIONS"]),
                            "signal_to_ready_s": float(entry["EPOLLD_DURATION_S"]),
                            "steps_s": json.loads(entry["EPOLLD_STEPS"]),
                            "systemctl_restart_s": round(restart_s, 3),
                            "all_echoing_again_s": round(all_echoing_s, 3),
                            "store_after": c.show("epolld", "NFileDescriptorStore"),
                        }
                    ),
                    flush=True,
                )
            for sock in socks:
                sock.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
