#!/usr/bin/env python3
"""The restart handoff under a real systemd 252 (in a container): N connections through
`systemctl restart`, each step's time from the new process's handoff_complete entry.

    .venv/bin/python bench/handoff_systemd.py --conns 10000 --restarts 2     # as root, ~1 min
    .venv/bin/python bench/handoff_systemd.py --conns 100000 --workers 6     # issue 24, ~3 min

With --workers (more connections than one process may hold: 20,000 descriptors here) the
connections come from bench/loadgen.c holder processes of 10,000 each on source addresses
127.0.0.2, .3, ... in the container's network, and one restart is measured: at their release
each of them echoes one more byte (loadgen --reprobe), or the run fails.

The container runs this checkout (as tests/system do: the packaged unit, Debian's python3);
the clients live in its network namespace. After each restart every connection must echo
one more byte, or the run fails. bench/run's handoff workloads measure the re-exec path
on the host; this one measures the fd store path.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
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
    parser.add_argument("--workers", type=int, default=0, help="workers: N, loadgen clients")
    opts = parser.parse_args()
    if opts.workers:
        return with_workers(opts.conns, opts.workers)
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


def with_workers(conns: int, workers: int) -> int:
    """One `systemctl restart` of an epolld with `workers: N` holding `conns` connections
    from loadgen holders; every connection must echo again afterwards."""
    sys.path.insert(0, str(REPO / "bench"))
    from epolld_bench.bootstrap import bootstrap
    from epolld_bench.paths import BIN

    bootstrap(need_venv=False)  # loadgen
    per_holder, addrs = 10_000, max(2, -(-conns // 20_000))
    with Container(binds_ro={REPO: GUEST_REPO}) as c:
        install_checkout(c)
        c.write_file(
            "/etc/epolld.yaml",
            'listen: ["127.0.0.1:7080"]\n'
            f"workers: {workers}\n"
            f"limits: {{max_connections: {conns + 1000}, idle_timeout: 0}}\n"
            "logging: {connections: false}\n",
        )
        c.systemctl("start", "epolld")
        c.wait_for_state("epolld", ["active"], 60)
        holders = []
        started = time.monotonic()
        with c.network():
            for offset in range(0, conns, per_holder):
                share = min(per_holder, conns - offset)
                argv = [str(BIN / "loadgen"), "--port", "7080", "--warmup", "0",
                        "--duration", "900", "--hold-stdin", "--mode", "pingpong", "--conns", "0",
                        "--idle", str(share), "--source-addrs", str(addrs),
                        "--source-offset", str(offset), "--source-ports",
                        "--connect-timeout", "200",
                        "--reprobe", "--drain-timeout", "60"]  # fmt: skip
                holders.append(
                    subprocess.Popen(
                        argv,
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                    )
                )
        try:
            for h in holders:
                assert h.stderr is not None
                line = h.stderr.readline()
                assert line.strip() == b"established", line
            established_s = time.monotonic() - started
            before = len(handoffs(c))
            started = time.monotonic()
            c.systemctl("restart", "epolld")
            restart_s = time.monotonic() - started
            entry = wait_until(
                lambda: [e for e in handoffs(c)[before:] if "EPOLLD_WORKER" not in e] or None,
                120,
                "the supervisor's handoff_complete",
            )[0]
            results = []
            for h in holders:
                out, _ = h.communicate(input=b"", timeout=300)
                results.append(json.loads(out))
        finally:
            for h in holders:
                if h.poll() is None:
                    h.kill()
                    h.wait()
        reprobed = sum(r["reprobed"] for r in results)
        errors = sum(r["error_total"] for r in results)
        # Past the dynamic user's limit of descriptors in flight, the rest get a FIN.
        over = c.journal("-u", "epolld", "EPOLLD_EVENT=handoff_over_limit")
        closed = sum(int(e["EPOLLD_CONNECTIONS"]) for e in over)
        eofs = sum(r["errors"].get("eof", 0) for r in results)
        if errors != eofs or eofs != closed:  # what the service said: warnings and errors
            for e in c.journal("-u", "epolld", "-p", "warning"):
                print("journal:", e.get("MESSAGE"), e.get("EPOLLD_EVENT"), flush=True)
            kinds: dict[str, int] = {}
            for r in results:
                for k, n in r["errors"].items():
                    kinds[k] = kinds.get(k, 0) + n
            print("client errors:", kinds, flush=True)
        print(
            json.dumps(
                {
                    "connections": int(entry["EPOLLD_CONNECTIONS"]),
                    "workers": workers,
                    "established_s": round(established_s, 1),
                    "signal_to_ready_s": float(entry["EPOLLD_DURATION_S"]),
                    "steps_s": json.loads(entry["EPOLLD_STEPS"]),
                    "systemctl_restart_s": round(restart_s, 3),
                    "echoing_again": reprobed,
                    "echoing_again_s": max(r["reprobe_s"] for r in results),
                    "client_errors": errors,
                    "closed_over_limit": closed,
                    "over_limit_reasons": sorted({e.get("EPOLLD_REASON", "") for e in over}),
                    "store_after": c.show("epolld", "NFileDescriptorStore"),
                }
            ),
            flush=True,
        )
        # Every connection echoes again or got the FIN the service counted for it.
        return 0 if errors == eofs == closed and reprobed + closed == conns else 1


if __name__ == "__main__":
    raise SystemExit(main())
