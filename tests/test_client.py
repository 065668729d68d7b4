"""epolld-client as a real subprocess against small real servers on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from epolld import __version__
from epolld.client import cli, errors, payload
from tests import echo_servers
from tests.conftest import StartDaemon
from tests.echo_servers import serving

RUN_TIMEOUT_S = 60.0  # bound on every client subprocess


def run_client(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run `python -m epolld.client ARGS` with stdin piped (or /dev/null) and wait for it."""
    return subprocess.run(
        [sys.executable, "-m", "epolld.client", *args],
        input=stdin,
        stdin=subprocess.DEVNULL if stdin is None else None,
        capture_output=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )


def port_args(server: echo_servers.ThreadedServer) -> list[str]:
    return ["--host", "127.0.0.1", "--port", str(server.port)]


class Recorder:
    """An echo handler that also keeps every byte it received, per connection."""

    def __init__(self) -> None:
        self.streams: list[bytes] = []
        self._lock = threading.Lock()

    def __call__(self, conn: socket.socket) -> None:
        received = bytearray()
        while data := conn.recv(echo_servers.RECV_SIZE):
            received += data
            conn.sendall(data)
        with self._lock:
            self.streams.append(bytes(received))


# --check against a correct server


def test_check_ping_pong_passes_and_reports_figures() -> None:
    """Ping-pong --check exits 0 against a correct server and prints latency and throughput."""
    with serving(echo_servers.echo) as server:
        result = run_client("--check", *port_args(server), "--count", "20", "--size", "1KiB")
    assert result.returncode == 0, result.stderr
    out = result.stdout.decode()
    assert f"check passed: 20 messages, 20480 bytes echoed intact by 127.0.0.1:{server.port}" in out
    assert re.search(
        r"latency \(first byte sent .*p50 [\d.]+ ms, p90 [\d.]+ ms, p99 [\d.]+ ms,"
        r" p99\.9 [\d.]+ ms, max [\d.]+ ms",
        out,
    )
    assert re.search(r"throughput: [\d.]+ MB/s echoed .*, \d+ messages/s", out)
    assert result.stderr == b""
    assert server.errors == []  # the client ended with a clean EOF, not a reset


def test_check_pipelined_with_size_range_and_connections_passes() -> None:
    """Pipelined --check with random sizes over three connections verifies every message."""
    with serving(echo_servers.echo) as server:
        result = run_client(
            "--check",
            *port_args(server),
            "--mode=pipelined",
            "--window=16KiB",
            "--size=1-64KiB",
            "--count=30",
            "--connections=3",
            "--seed=7",
        )
    assert result.returncode == 0, result.stderr
    out = result.stdout.decode()
    assert "check passed: 90 messages" in out
    assert "over 3 connections" in out
    assert "mode pipelined, sizes 1-65536 B, seed 7" in out
    assert "latency (last byte sent to last byte echoed)" in out


@pytest.mark.parametrize("mode", ["ping-pong", "pipelined"])
def test_check_messages_larger_than_socket_buffers_do_not_deadlock(mode: str) -> None:
    """4 MiB messages complete because the client reads the echo while it is still sending."""
    with serving(echo_servers.echo) as server:
        result = run_client(
            "--check", *port_args(server), f"--mode={mode}", "--size=4MiB", "--count=3"
        )
    assert result.returncode == 0, result.stderr
    assert b"3 messages, 12582912 bytes echoed intact" in result.stdout


def test_check_sends_the_same_bytes_for_the_same_seed() -> None:
    """--seed makes the random messages reproducible, and different seeds differ."""
    recorder = Recorder()
    with serving(recorder) as server:
        for seed in ("1", "1", "2"):
            result = run_client("--check", *port_args(server), "--count=3", f"--seed={seed}")
            assert result.returncode == 0, result.stderr
    first, again, other = recorder.streams
    assert len(first) == 3 * 1024
    assert first == again
    assert first != other


def test_check_against_unix_socket_passes(tmp_path: Path) -> None:
    """--unix PATH checks a server on a Unix stream socket."""
    path = str(tmp_path / "echo.sock")
    with serving(echo_servers.echo, unix_path=path):
        result = run_client("--check", "--unix", path, "--count=10")
    assert result.returncode == 0, result.stderr
    assert f"echoed intact by unix:{path}".encode() in result.stdout


# --check failures


def hex_field(name: str, report: str) -> bytes:
    """Return the bytes a mismatch report lists in hex after `name:`."""
    match = re.search(rf"^  {name}: +([0-9a-f ]+)$", report, re.MULTILINE)
    assert match, report
    return bytes.fromhex(match.group(1))


@pytest.mark.parametrize("mode", ["ping-pong", "pipelined"])
def test_corrupted_echo_is_reported_with_its_offsets(mode: str) -> None:
    """A server flipping the byte at stream offset 2500 fails --check; the report names it."""
    with serving(echo_servers.corrupting(2500)) as server:
        result = run_client(
            "--check", *port_args(server), f"--mode={mode}", "--size=1000", "--count=5", "--seed=3"
        )
    assert result.returncode == errors.EXIT_MISMATCH
    assert result.stdout == b""
    err = result.stderr.decode()
    assert (
        f"Error: echo diverged on 127.0.0.1:{server.port} at stream offset 2500"
        " (message 3 of 5, offset 500 of 1000 bytes)"
    ) in err
    expected, got = hex_field("expected", err), hex_field("got", err)
    assert got[0] == expected[0] ^ 0xFF
    assert got[1:] == expected[1 : len(got)]
    assert "--seed 3 sends the same messages again" in err


def test_reordered_blocks_are_reported() -> None:
    """A server swapping the first two 64 KiB blocks fails --check at stream offset 0."""
    with serving(echo_servers.swapping_first_blocks(payload.BLOCK_SIZE)) as server:
        result = run_client("--check", *port_args(server), "--size=1MiB", "--count=2")
    assert result.returncode == errors.EXIT_MISMATCH
    assert "at stream offset 0 (message 1 of 2, offset 0 of 1048576 bytes)" in (
        result.stderr.decode()
    )


def test_extra_echoed_bytes_are_reported() -> None:
    """A server echoing everything twice fails --check at the first duplicated byte."""
    with serving(echo_servers.doubling) as server:
        result = run_client("--check", *port_args(server), "--size=1000", "--count=5")
    assert result.returncode == errors.EXIT_MISMATCH
    # Whether the duplicate arrives with the echo or after the next message was sent,
    # the report names stream offset 1000.
    assert "stream offset 1000" in result.stderr.decode()


def test_server_closing_early_is_reported() -> None:
    """A server that stops after 1500 of 5000 bytes fails with the early-EOF error and exit code."""
    with serving(echo_servers.closing_after(1500)) as server:
        result = run_client("--check", *port_args(server), "--size=1000", "--count=5")
    assert result.returncode == errors.EXIT_CLOSED_EARLY
    assert result.stderr.decode() == (
        f"Error: 127.0.0.1:{server.port} closed the connection after echoing 1500 of the"
        " 2000 bytes sent (1 of 5 messages complete)\n"
    )


def test_connection_refused_is_reported() -> None:
    """A port bound but not listening gives the connection-refused error and exit code."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))  # bound, never listening: nothing else can take the port
        port = held.getsockname()[1]
        result = run_client("--check", "--port", str(port))
    assert result.returncode == errors.EXIT_REFUSED
    assert result.stderr.decode() == (
        f"Error: connection refused by 127.0.0.1:{port} (is the server running?)\n"
    )


def test_missing_unix_socket_is_reported(tmp_path: Path) -> None:
    """A --unix path with no socket gives a one-line error and the refused exit code."""
    result = run_client("--unix", str(tmp_path / "absent.sock"))
    assert result.returncode == errors.EXIT_REFUSED
    assert result.stderr.decode() == (
        f"Error: no socket at {tmp_path / 'absent.sock'} (is the server running?)\n"
    )


def test_silent_server_times_out() -> None:
    """A server that never replies fails with the timeout error after --timeout."""
    with serving(echo_servers.silent) as server:
        result = run_client("--check", *port_args(server), "--timeout=0.5")
    assert result.returncode == errors.EXIT_TIMEOUT
    assert result.stderr.decode() == (
        f"Error: timed out after 0.5 s waiting for 127.0.0.1:{server.port}"
        " (0 of 1024 bytes echoed)\n"
    )


def test_pipelined_window_bounds_bytes_in_flight() -> None:
    """Pipelined --check never has more than --window bytes sent but not yet echoed."""
    sink = echo_servers.Sink()
    with serving(sink) as server:
        result = run_client(
            "--check",
            *port_args(server),
            "--mode=pipelined",
            "--window=10000",
            "--size=3000",
            "--timeout=0.5",
        )
    assert result.returncode == errors.EXIT_TIMEOUT
    assert "(0 of 10000 bytes echoed)" in result.stderr.decode()
    assert sink.received == 10000


def test_interrupt_exits_130_without_traceback() -> None:
    """SIGINT while waiting for an echo ends the client with exit code 130 and one line."""
    sink = echo_servers.Sink()
    with serving(sink) as server:
        proc = subprocess.Popen(
            [sys.executable, "-m", "epolld.client", *port_args(server)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            # A shell's background job (a CI script's `&`) inherits SIGINT ignored, and a
            # Python started so never installs its KeyboardInterrupt handler: restore it.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        try:
            assert proc.stdin is not None
            proc.stdin.write(b"waiting\n")
            proc.stdin.flush()
            assert sink.first_bytes.wait(RUN_TIMEOUT_S)  # the client now waits for the echo
            proc.send_signal(signal.SIGINT)
            # Wait before reading: communicate() would close stdin at once, and a client
            # that sees EOF there before the signal half-closes, and the sink then closes.
            proc.wait(RUN_TIMEOUT_S)
            out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=RUN_TIMEOUT_S)
    assert (proc.returncode, out, err) == (errors.EXIT_INTERRUPTED, b"", b"\nInterrupted\n")


def test_connect_timeout_is_reported() -> None:
    """A listener with a full backlog drops the SYN, so connecting times out after --timeout."""
    with socket.socket() as listener, socket.socket() as filler:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)  # Linux queues one connection; further SYNs are dropped
        port = listener.getsockname()[1]
        filler.connect(("127.0.0.1", port))
        result = run_client("--check", "--port", str(port), "--timeout=0.5")
    assert result.returncode == errors.EXIT_TIMEOUT
    assert (
        result.stderr.decode() == f"Error: timed out after 0.5 s connecting to 127.0.0.1:{port}\n"
    )


def test_reset_by_server_is_reported() -> None:
    """A server closing with SO_LINGER 0 (RST) gives the reset error and exit code."""
    with serving(echo_servers.resetting) as server:
        result = run_client("--check", *port_args(server))
    assert result.returncode == errors.EXIT_RESET
    assert result.stderr.decode() == (
        f"Error: connection reset by 127.0.0.1:{server.port} after 0 of 1024 bytes echoed\n"
    )


# Each name fails inside the resolver without any DNS query (checked with strace):
# glibc refuses names over 255 bytes, Python's idna codec labels over 63 bytes.
@pytest.mark.parametrize("host", [".".join(["a" * 60] * 5) + ".invalid", "a" * 64 + ".invalid"])
def test_unresolvable_host_is_reported(host: str) -> None:
    """A host name that cannot be resolved gives a one-line error and the resolve exit code."""
    result = run_client("--host", host, "--check")
    assert result.returncode == errors.EXIT_RESOLVE
    err = result.stderr.decode()
    assert err.startswith(f"Error: cannot resolve host {host!r}: ")
    assert err.count("\n") == 1


# Interactive mode


def test_piped_lines_are_echoed_without_prompts() -> None:
    """With stdin piped, each line is sent and its echo printed, with no prompt."""
    with serving(echo_servers.echo) as server:
        result = run_client(*port_args(server), stdin=b"a\nb\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"a\nb\n"
    assert result.stderr == b""
    assert server.errors == []


def test_piped_binary_data_round_trips_exactly(tmp_path: Path) -> None:
    """Piped binary stdin, long lines and a last line without newline come back byte for byte."""
    data = bytes(range(256)) * 1000 + b"\nshort\n\n" + b"x" * 200_000 + b"\nno newline"
    path = str(tmp_path / "echo.sock")
    with serving(echo_servers.echo, unix_path=path):
        result = run_client("--unix", path, stdin=data)
    assert result.returncode == 0, result.stderr
    assert result.stdout == data


def test_empty_stdin_exits_cleanly() -> None:
    """EOF on stdin at once shuts the connection down and exits 0."""
    with serving(echo_servers.echo) as server:
        result = run_client(*port_args(server), stdin=b"")
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
    assert server.errors == []


def test_interactive_server_closing_is_reported() -> None:
    """In interactive mode a server that closes before echoing gives the early-EOF error."""
    with serving(echo_servers.closing_after(3)) as server:
        result = run_client(*port_args(server), stdin=b"hello\n")
    assert result.returncode == errors.EXIT_CLOSED_EARLY
    assert result.stderr.decode() == (
        f"Error: 127.0.0.1:{server.port} closed the connection after echoing 3 of the"
        " 6 bytes sent\n"
    )


@contextlib.contextmanager
def terminal_client(*args: str) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """Start the client on a pseudo-terminal; yield the process and the terminal's master fd."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "epolld.client", *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
        )
    finally:
        os.close(slave)
    try:
        yield proc, master
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(RUN_TIMEOUT_S)
        os.close(master)


def read_until(master: int, marker: bytes) -> bytes:
    """Read the terminal until marker appears; fail if it does not within the bound."""
    seen = b""
    while marker not in seen:
        readable, _, _ = select.select([master], [], [], RUN_TIMEOUT_S)
        assert readable, f"no {marker!r} on the terminal; got {seen!r}"
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the client exited and closed the terminal
            chunk = b""
        assert chunk, f"terminal closed before {marker!r}; got {seen!r}"
        seen += chunk
    return seen


def test_terminal_session_prompts_and_prints_receive() -> None:
    """On a terminal it prompts "Input Something:", prints "Receive: ..." and ends on Ctrl-D."""
    with serving(echo_servers.echo) as server, terminal_client(*port_args(server)) as (proc, tty):
        read_until(tty, b"Input Something: ")
        os.write(tty, b"hello epoll\n")
        assert b"Receive: hello epoll\r\n" in read_until(tty, b"Input Something: ")
        os.write(tty, b"\x04")  # Ctrl-D
        assert proc.wait(RUN_TIMEOUT_S) == 0
    assert server.errors == []


# Command line


def test_version_is_printed() -> None:
    """--version prints the program name and the package version."""
    result = run_client("--version")
    assert (result.returncode, result.stdout) == (0, f"epolld-client {__version__}\n".encode())


def test_help_documents_exit_codes() -> None:
    """--help lists every exit code the client can return."""
    out = run_client("--help").stdout.decode()
    for code in (65, 68, 69, 71, 74, 75, 76, 130):
        assert re.search(rf"^  {code} +\S", out, re.MULTILINE), code


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--check", "--size=0"], "size must be at least 1 byte"),
        (["--check", "--size=12XB"], "not a size: '12XB'"),
        (["--check", "--size=1KB"], "ambiguous unit in '1KB': write KiB (1024-based) or bytes"),
        (["--check", "--size=1-2M"], "ambiguous unit in '2M': write MiB"),
        (["--check", "--size=2KiB-1KiB"], "empty size range"),
        (["--unix=/x", "--port=1"], "--unix excludes --host and --port"),
        (["--count=5"], "--count only make sense with --check"),
        (["--check", "--window=1KiB"], "--window only applies to --mode pipelined"),
        (["--check", "--connections=0"], "--connections must be at least 1"),
        (["--port=70000"], "--port must be 1-65535"),
    ],
)
def test_bad_command_line_exits_2(args: list[str], message: str) -> None:
    """A bad option gives argparse's usage error naming the problem, and exit code 2."""
    result = run_client(*args)
    assert result.returncode == 2
    assert message in result.stderr.decode()


@pytest.mark.parametrize(
    ("text", "size"),
    [("64", 64), ("64B", 64), ("1KiB", 1024), ("1kib", 1024), ("2MiB", 2 << 20), ("1GiB", 1 << 30)],
)
def test_parse_size_accepts_units(text: str, size: int) -> None:
    """Sizes accept plain bytes and the 1024-based KiB, MiB, GiB, case-insensitively."""
    assert cli.parse_size(text) == size


def test_console_script_is_installed() -> None:
    """The epolld-client console script runs main() (checked through --version)."""
    script = Path(sys.executable).parent / "epolld-client"
    result = subprocess.run(
        [str(script), "--version"], capture_output=True, timeout=RUN_TIMEOUT_S, check=False
    )
    assert result.stdout == f"epolld-client {__version__}\n".encode()


# Against the real daemon (a subprocess on port 0, in each trigger mode)


@pytest.mark.slow
@pytest.mark.parametrize("client_mode", ["ping-pong", "pipelined"])
def test_check_passes_against_epolld(start_daemon: StartDaemon, client_mode: str) -> None:
    """--check over four connections with sizes up to 256 KiB passes against the real daemon."""
    daemon = start_daemon()
    result = run_client(
        "--check",
        "--port",
        str(daemon.port),
        f"--mode={client_mode}",
        "--size=1-256KiB",
        "--count=100",
        "--connections=4",
        "--seed=5",
    )
    assert result.returncode == 0, result.stderr
    assert "check passed: 400 messages, " in result.stdout.decode()
    assert f"echoed intact by 127.0.0.1:{daemon.port} over 4 connections" in (
        result.stdout.decode()
    )


@pytest.mark.slow
def test_check_and_interactive_against_epolld_on_unix_and_ipv6(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """The client reaches the real daemon on a Unix socket and on [::1], in both modes of use."""
    path = str(tmp_path / "epolld.sock")
    daemon = start_daemon({"listen": [f"unix:{path}", "[::1]:0"]})
    addresses = [event["address"] for event in daemon.wait_for("listening", count=2)]
    ipv6_port = next(a for a in addresses if a.startswith("[::1]:")).rsplit(":", 1)[1]
    for where in (["--unix", path], ["--host", "::1", "--port", ipv6_port]):
        checked = run_client("--check", *where, "--size=64KiB", "--count=20")
        assert checked.returncode == 0, checked.stderr
        echoed = run_client(*where, stdin=b"Input Something\nReceive\n")
        assert (echoed.returncode, echoed.stdout) == (0, b"Input Something\nReceive\n")
    assert f"echoed intact by [::1]:{ipv6_port}" in checked.stdout.decode()
