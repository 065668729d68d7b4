#!/usr/bin/env python3
"""bench/million.py: as many concurrent connections as this host holds, up to 1,000,000, on one
epolld with `workers: N` (issue 24). Root only; not part of `make test` or `make bench`.

    .venv/bin/python bench/million.py --conns 100000 --workers 6     # the dry run (~1 min)
    .venv/bin/python bench/million.py --conns 1000000 --workers 60   # the million

Everything runs in a network namespace of its own (created here, removed at the end): the
host's connection tracking (262,144 entries once any iptables rule exists) does not apply
there. The server is pinned to CPU 0 at nice -10, the clients to CPU 1, as in bench/run.

The clients are loadgen processes of --per-holder idle connections each (one probe byte
echoed, then idle), bound to source addresses 127.0.0.2 ... (--source-addrs) so that the
4-tuples do not run out. They are added one at a time; after each, MemAvailable is read,
and no more are added once it is under --floor-gib (2 GiB: the machine is shared). Then one
ping-pong client measures the latency beside them all, and at the release every held
connection echoes one more byte (loadgen --reprobe). The result: the largest count reached,
the time to reach it, the memory per connection (the server's Pss, and the whole machine's
MemAvailable drop, which is mostly the kernel's sockets on both ends), and what stopped it.
Written to --output (JSON) and printed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from epolld_bench import processes
from epolld_bench.bootstrap import bootstrap
from epolld_bench.paths import BIN, EPOLLD, OUT
from epolld_bench.servers import listening_event

ESTABLISH_TIMEOUT_S = 300.0  # for one holder process to connect and echo once
HOLD_S = 3600  # the holders' own bound, released or not


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/million.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--conns", type=int, default=1_000_000, help="at most this many")
    p.add_argument("--workers", type=int, default=60, help="epolld workers (<= 20,000 fds each)")
    p.add_argument("--per-holder", type=int, default=16_000, help="connections per client")
    p.add_argument("--source-addrs", type=int, default=0, help="default: one per 20,000")
    p.add_argument("--floor-gib", type=float, default=2.0, help="stop under this MemAvailable")
    p.add_argument(
        "--worker-timeout",
        type=float,
        default=30.0,
        help="seconds a silent worker is given before the supervisor replaces it (10 by"
        " default; set through WATCHDOG_USEC, 4x this, with a NOTIFY_SOCKET of the bench's"
        " own, as WatchdogSec would under systemd)",
    )
    p.add_argument("--max-seconds", type=float, default=0, help="stop adding after this long")
    p.add_argument(
        "--cpus", default="", help="one taskset list for server and clients (default: 0 and 1)"
    )
    p.add_argument("--nice", type=int, help="one nice level for all (default: -10 and 0)")
    p.add_argument("--output", default=str(OUT / "million.json"))
    return p.parse_args()


def mem_available_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    raise RuntimeError("no MemAvailable in /proc/meminfo")


class Namespace:
    """A network namespace with only its loopback up; nothing is tracked there."""

    def __init__(self) -> None:
        self.name = f"epolld-million-{os.getpid()}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        self.run(["ip", "link", "set", "lo", "up"])

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def run(self, argv: list[str]) -> str:
        return subprocess.run(
            [*self.prefix(), *argv], check=True, capture_output=True, text=True
        ).stdout

    def established(self) -> int:
        """Established TCP connections in the namespace (both ends counted once): the
        sockets in use from /proc/net/sockstat, less the listeners, halved."""
        sockstat = self.run(["cat", "/proc/net/sockstat"])
        inuse = next(
            int(line.split()[2]) for line in sockstat.splitlines() if line.startswith("TCP:")
        )
        listeners = self.run(["ss", "-Htln"]).count("\n")
        return (inuse - listeners) // 2

    def conntrack_count(self) -> str:
        try:
            return self.run(["cat", "/proc/sys/net/netfilter/nf_conntrack_count"]).strip()
        except subprocess.CalledProcessError:
            return "no conntrack in this namespace"

    def remove(self) -> None:
        subprocess.run(["ip", "netns", "delete", self.name], check=False)


class NotifySink:
    """A NOTIFY_SOCKET of the bench's own, read and dropped by a thread: epolld takes
    WATCHDOG_USEC (and so the supervisor's worker timeout, a quarter of it) only when it
    has a NOTIFY_SOCKET, as under systemd. Without one, --worker-timeout did nothing
    before (the supervisor's default of 10 s applied)."""

    def __init__(self) -> None:
        self.path = OUT / f"million-notify-{os.getpid()}.sock"
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                _, fds, _, _ = socket.recv_fds(self.sock, 4096, 16)
                for fd in fds:
                    os.close(fd)


def cpu0_shares() -> dict[str, int]:
    """CPU 0's jiffies by kind so far (/proc/stat): user, system, softirq, idle, other."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu0 "):
            user, nice, system, idle, iowait, irq, softirq, steal = map(int, line.split()[1:9])
            return {"user": user + nice, "system": system, "softirq": softirq + irq,
                    "idle": idle + iowait, "steal": steal}  # fmt: skip
    return {}


def server_cpu_s(proc: subprocess.Popen[bytes]) -> float:
    """utime + stime of the supervisor and its live workers so far."""
    total = 0
    for pid in processes.tree_pids(proc.pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def start_server(
    ns: Namespace, workers: int, conns: int, worker_timeout_s: float
) -> tuple[subprocess.Popen[bytes], int, Path]:
    config = OUT / "million.yaml"
    config.write_text(
        "# Written by bench/million.py\n"
        'listen: ["127.0.0.1:0"]\n'
        f"workers: {workers}\n"
        # Each worker's longest turn, in every worker's stats line and the supervisor's (a
        # stats line sums every open connection: every 30 s, not the default 60, is cheap).
        "stats_interval: 30s\n"
        "watchdog: true\n"
        "limits:\n"
        f"  max_connections: {conns + 1000}\n"
        "  idle_timeout: 0\n"
    )
    log = OUT / "logs" / "million.server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    pinned = processes.pinned(processes.SERVER_CPUS, processes.NICE_LEVEL)
    argv = [*ns.prefix(), *pinned, str(EPOLLD),
            "--config", str(config), "--log-format", "json"]  # fmt: skip
    with log.open("wb") as out:
        # Sixty workers on one shared core: a worker can go 10 s without a turn (one did,
        # and was replaced with its connections). The supervisor's timeout is a quarter of
        # WatchdogSec; no NOTIFY_SOCKET, so the pings themselves go nowhere.
        sink = NotifySink()
        env = {
            **os.environ,
            "NOTIFY_SOCKET": str(sink.path),
            "WATCHDOG_USEC": str(int(worker_timeout_s * 4e6)),
        }
        proc = processes.spawn(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env
        )
    niced_group(proc, processes.NICE_LEVEL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            event = listening_event(line)
            if event:
                while len(processes.tree_pids(proc.pid)) < workers + 1:
                    if time.monotonic() > deadline:
                        raise RuntimeError("the workers did not all start")
                    time.sleep(0.1)
                time.sleep(1.0)
                return proc, int(event["port"]), log
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise RuntimeError("epolld did not start: " + log.read_text(errors="replace")[-800:])


def niced_group(proc: subprocess.Popen[bytes], nice: int) -> None:
    """Give the process's session (its autogroup: `ip netns exec` execs, so the PID stays)
    the nice value its command has. processes.spawn() does so only for a command that
    starts with nice, not behind `ip netns exec`: before, the 61 epolld processes shared one
    autogroup at nice 0, as much of CPU 0 in all as any other session's one job."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{proc.pid}/autogroup").write_text(str(nice))


def server_pss_kib(proc: subprocess.Popen[bytes]) -> int:
    return sum(processes.pss_kib(pid) or 0 for pid in processes.tree_pids(proc.pid))


def loadgen(ns: Namespace, port: int, args: list[str], nice: int) -> list[str]:
    return [*ns.prefix(), *processes.pinned(processes.CLIENT_CPUS, nice), str(BIN / "loadgen"),
            "--port", str(port), *args]  # fmt: skip


def wait_established(proc: subprocess.Popen[bytes]) -> str | None:
    """None once the holder says "established", else what went wrong."""
    assert proc.stderr is not None
    deadline, line = time.monotonic() + ESTABLISH_TIMEOUT_S, b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([proc.stderr], [], [], left)[0]:
            return "did not establish its connections in time"
        chunk = os.read(proc.stderr.fileno(), 1)
        if not chunk:
            return "exited early"
        line += chunk
    return None if line.strip() == b"established" else line.decode(errors="replace").strip()


def run(opts: argparse.Namespace, ns: Namespace) -> dict[str, Any]:
    addrs = opts.source_addrs or max(2, -(-opts.conns // 20_000))
    floor_kib = int(opts.floor_gib * 1024 * 1024)
    result: dict[str, Any] = {"target": opts.conns, "workers": opts.workers,
                              "per_holder": opts.per_holder, "source_addrs": addrs,
                              "floor_gib": opts.floor_gib, "cpus": opts.cpus or "0 and 1",
                              "worker_timeout_s": opts.worker_timeout,
                              "nice": opts.nice}  # fmt: skip
    mem_before = mem_available_kib()
    proc, port, log = start_server(ns, opts.workers, opts.conns, opts.worker_timeout)
    start_pss = server_pss_kib(proc)
    mem_started = mem_available_kib()
    result.update(
        mem_available_before_mib=mem_before // 1024, server_start_pss_mib=start_pss // 1024
    )
    holders: list[subprocess.Popen[bytes]] = []
    asked = 0
    stopped_by = f"the target of {opts.conns:,} was reached"
    t0 = time.monotonic()
    steps = []
    last_cpu, last_shares, last_at = server_cpu_s(proc), cpu0_shares(), t0
    while asked < opts.conns:
        share = min(opts.per_holder, opts.conns - asked)
        args = ["--warmup", "0", "--duration", str(HOLD_S), "--hold-stdin", "--mode", "pingpong",
                "--conns", "0", "--size", "1024", "--idle", str(share),
                "--source-addrs", str(addrs), "--source-offset", str(asked), "--source-ports",
                "--connect-timeout", "120", "--reprobe", "--drain-timeout", "120"]  # fmt: skip
        holder = processes.spawn(
            loadgen(ns, port, args, processes.BACKGROUND_NICE_LEVEL),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        niced_group(holder, processes.BACKGROUND_NICE_LEVEL)
        holders.append(holder)
        problem = wait_established(holder)
        asked += share
        count, mem = ns.established(), mem_available_kib()
        cpu, shares, now = server_cpu_s(proc), cpu0_shares(), time.monotonic()
        spent = {k: shares[k] - last_shares.get(k, 0) for k in shares}
        busy = sum(spent.values()) or 1
        unresponsive = log.read_text(errors="replace").count('"worker_unresponsive"')
        steps.append({"t_s": round(now - t0, 2), "established": count,
                      "mem_available_mib": mem // 1024,
                      # Where CPU 0 went since the step before, and epolld's own share:
                      # starvation (epolld's share small, the core busy with others) or
                      # work (epolld's share large).
                      "cpu0": {k: round(v / busy, 3) for k, v in spent.items()},
                      "epolld_cpu_share": round((cpu - last_cpu) / max(1e-9, now - last_at), 3),
                      "workers_replaced": unresponsive})  # fmt: skip
        last_cpu, last_shares, last_at = cpu, shares, now
        print(f"[{now - t0:7.1f}s] {count:>9,} established"
              f"  MemAvailable {mem / 1048576:5.1f} GiB  server Pss"
              f" {server_pss_kib(proc) / 1024:7.1f} MiB  epolld CPU"
              f" {steps[-1]['epolld_cpu_share']:.2f}  cpu0 {steps[-1]['cpu0']}"
              f"  replaced {unresponsive}", flush=True)  # fmt: skip
        if problem:
            stopped_by = f"a client {problem} (at {asked:,} asked, {count:,} established)"
            break
        if count < asked:
            stopped_by = f"{asked - count:,} of {asked:,} connections were not established"
            break
        if mem < floor_kib:
            stopped_by = f"MemAvailable fell under {opts.floor_gib} GiB ({mem // 1024:,} MiB)"
            break
        if proc.poll() is not None:
            stopped_by = "epolld exited"
            break
        if opts.max_seconds and time.monotonic() - t0 > opts.max_seconds:
            stopped_by = f"the time budget of {opts.max_seconds:.0f} s (--max-seconds) ran out"
            break
    reached_s = time.monotonic() - t0
    count = ns.established()
    pss = server_pss_kib(proc)
    mem_after = mem_available_kib()
    result.update(
        established=count, stopped_by=stopped_by, time_to_reach_s=round(reached_s, 1),
        holders=len(holders), server_pss_mib=pss // 1024,
        server_pss_kib_per_conn=round((pss - start_pss) / max(1, count), 3),
        mem_available_after_mib=mem_after // 1024,
        machine_kib_per_conn=round((mem_started - mem_after) / max(1, count), 3),
        conntrack_in_namespace=ns.conntrack_count(), steps=steps,
    )  # fmt: skip
    # One ping-pong client beside them all.
    probe = subprocess.run(
        loadgen(ns, port, ["--server-pid", str(proc.pid), "--warmup", "0.5", "--duration", "3",
                           "--mode", "pingpong", "--conns", "1", "--size", "1024"],
                processes.NICE_LEVEL),
        capture_output=True, timeout=120,
    )  # fmt: skip
    with contextlib.suppress(ValueError):
        pp = json.loads(probe.stdout)
        result["pingpong"] = {
            k: pp.get(k) for k in ("round_trips_per_s", "latency_us", "error_total")
        }
    # The release: every held connection echoes once more, then the holders report.
    t_release = time.monotonic()
    held = []
    Path(opts.output).write_text(json.dumps(result, indent=1) + "\n")  # so far, in case
    for holder in holders:
        assert holder.stdin is not None
        holder.stdin.close()
    for holder in holders:
        assert holder.stdout is not None
        out = holder.stdout.read()  # until it exits: its JSON at the end
        holder.wait(timeout=300)
        with contextlib.suppress(ValueError):
            held.append(json.loads(out))
    result["reprobed"] = sum(r.get("reprobed", 0) for r in held)
    result["reprobe_s"] = round(time.monotonic() - t_release, 1)
    result["client_errors"] = sum(r.get("error_total", 0) for r in held)
    result["client_error_kinds"] = {
        k: sum((r.get("errors") or {}).get(k, 0) for r in held)
        for k in ("connect", "mismatch", "excess", "eof", "reset", "other", "lost_bytes", "stalled")
    }
    result["server_alive"] = proc.poll() is None
    result["server_log_warnings"] = [
        line for line in log.read_text(errors="replace").splitlines()
        if '"level": "warning"' in line or '"level": "error"' in line
    ][:10]  # fmt: skip
    return result


def main() -> int:
    opts = parse_args()
    if os.geteuid() != 0:
        print("bench/million.py: needs root (a network namespace of its own)", file=sys.stderr)
        return 2
    bootstrap(need_venv=False)
    if opts.cpus:  # a run beside other benchmarks: its own cores and priority
        processes.use_cpus(opts.cpus, opts.cpus)
    if opts.nice is not None:
        processes.NICE_LEVEL = processes.BACKGROUND_NICE_LEVEL = opts.nice
    os.sched_setaffinity(0, set(processes.parse_cpus(processes.CLIENT_CPUS)))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    ns = Namespace()
    try:
        result = run(opts, ns)
    finally:
        processes.stop_all()
        ns.remove()
    Path(opts.output).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "steps"}, indent=1))
    return 0 if result["client_errors"] == 0 and result["server_alive"] else 1


if __name__ == "__main__":
    sys.exit(main())
