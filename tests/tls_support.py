"""Certificates made with the openssl CLI, and the TLS clients the tests drive.

Tools: openssl (always present), and gnutls-cli, socat and ncat, installed with
packaging/dev/apt-install on first use (as tests/haproxy.py installs haproxy). The
OpenSSL-based tools (s_client, socat, ncat) are held to TLS 1.2 through an OPENSSL_CONF
file whose MaxProtocol says so: ncat has no option for it.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
APT_INSTALL = REPO / "packaging" / "dev" / "apt-install"
TOOLS = {"gnutls-cli": "gnutls-bin", "socat": "socat", "ncat": "ncat"}
WAIT_S = 20.0


def install_tools() -> None:
    """Install gnutls-bin, socat and ncat if missing (root installs; else apt-install
    fails saying which packages are needed)."""
    missing = [pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None]
    if missing:
        subprocess.run([str(APT_INSTALL), *missing], check=True, timeout=600)


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


@dataclass(frozen=True)
class Pair:
    certificate: Path
    key: Path


@dataclass(frozen=True)
class Certs:
    """A CA, server certificates signed by it, and client certificates."""

    ca: Pair
    server: Pair  # CN=localhost
    other: Pair  # CN=other.example, for SNI and the reload swap
    client: Pair  # signed by the CA
    stranger: Pair  # a self-signed client certificate


def _signed(directory: Path, name: str, cn: str, ca: Pair, *, client: bool = False) -> Pair:
    key, csr, cert = (directory / f"{name}.{ext}" for ext in ("key", "csr", "pem"))
    ext = directory / f"{name}.ext"
    usage = "clientAuth" if client else "serverAuth"
    ext.write_text(f"subjectAltName=DNS:{cn}\nextendedKeyUsage={usage}\n")
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={cn}/O=epolld tests",
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca.certificate), "-CAkey", str(ca.key),
        "-CAcreateserial", "-days", "2", "-out", str(cert), "-extfile", str(ext),
    )  # fmt: skip
    return Pair(cert, key)


def _self_signed(directory: Path, name: str, cn: str, *, ca: bool = False) -> Pair:
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    extra = ["-addext", "basicConstraints=critical,CA:TRUE"] if ca else []
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={cn}", *extra,
    )  # fmt: skip
    return Pair(cert, key)


def make_expired(directory: Path) -> Pair:
    """A self-signed certificate whose notAfter is a day before its notBefore (now)."""
    key, csr, cert = (directory / f"expired.{ext}" for ext in ("key", "csr", "pem"))
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", str(key), "-out", str(csr), "-subj", "/CN=expired.example",
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(csr), "-signkey", str(key), "-days", "-1", "-out", str(cert)
    )
    return Pair(cert, key)


def make_not_yet_valid(directory: Path) -> Pair:
    """A self-signed certificate valid from 2099 (openssl ca: x509 in OpenSSL 3.0 cannot
    set notBefore)."""
    ca_dir = directory / "future-ca"
    ca_dir.mkdir()
    (ca_dir / "index.txt").write_text("")
    (ca_dir / "serial").write_text("01\n")
    config = ca_dir / "ca.cnf"
    config.write_text(
        f"[ca]\ndefault_ca = d\n[d]\ndatabase = {ca_dir}/index.txt\n"
        f"new_certs_dir = {ca_dir}\nserial = {ca_dir}/serial\npolicy = p\n"
        "default_md = sha256\n[p]\ncommonName = supplied\n"
    )
    key, csr, cert = (directory / f"future.{ext}" for ext in ("key", "csr", "pem"))
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", str(key), "-out", str(csr), "-subj", "/CN=future.example",
    )  # fmt: skip
    _openssl(
        "ca", "-batch", "-notext", "-config", str(config), "-selfsign", "-keyfile", str(key),
        "-in", str(csr), "-startdate", "20991231000000Z", "-enddate", "21000101000000Z",
        "-out", str(cert),
    )  # fmt: skip
    return Pair(cert, key)


def make_certs(directory: Path) -> Certs:
    directory.mkdir(parents=True, exist_ok=True)
    ca = _self_signed(directory, "ca", "epolld test CA", ca=True)
    return Certs(
        ca=ca,
        server=_signed(directory, "server", "localhost", ca),
        other=_signed(directory, "other", "other.example", ca),
        client=_signed(directory, "client", "client.example", ca, client=True),
        stranger=_self_signed(directory, "stranger", "stranger.example"),
    )


def max_tls12_conf(directory: Path) -> Path:
    """An OPENSSL_CONF that caps OpenSSL-based clients at TLS 1.2."""
    path = directory / "openssl-tls12.cnf"
    path.write_text(
        "openssl_conf = default_conf\n[default_conf]\nssl_conf = ssl_sect\n"
        "[ssl_sect]\nsystem_default = system_default_sect\n"
        "[system_default_sect]\nMaxProtocol = TLSv1.2\nCipherString = DEFAULT\n"
    )
    return path


def client_context(
    version: str | None = None, certs: Certs | None = None, client: Pair | None = None
) -> ssl.SSLContext:
    """A Python client context trusting the test CA (or nothing checked without certs)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if certs is None:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context.load_verify_locations(cafile=str(certs.ca.certificate))
    if version == "1.2":
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    elif version == "1.3":
        context.minimum_version = ssl.TLSVersion.TLSv1_3
    if client is not None:
        context.load_cert_chain(str(client.certificate), str(client.key))
    return context


def tls_connect(
    port: int,
    context: ssl.SSLContext,
    server_name: str | None = "localhost",
    sock: socket.socket | None = None,
) -> ssl.SSLSocket:
    sock = sock or socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
    sock.settimeout(WAIT_S)
    try:
        return context.wrap_socket(sock, server_hostname=server_name)
    except BaseException:
        sock.close()
        raise


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        chunk = sock.recv(min(65536, n - len(got)))
        if not chunk:
            break
        got += chunk
    return bytes(got)


ECHO_CHUNK_BYTES = 64 * 1024  # within what the socket buffers hold either way


def echo_python(sock: ssl.SSLSocket, payload: bytes) -> bytes:
    """Send payload a chunk at a time, reading each chunk's echo before the next (one
    thread: an OpenSSL connection must not be read and written from two at once)."""
    got = bytearray()
    for start in range(0, len(payload), ECHO_CHUNK_BYTES):
        chunk = payload[start : start + ECHO_CHUNK_BYTES]
        sock.sendall(chunk)
        echoed = recv_exactly(sock, len(chunk))
        got += echoed
        if len(echoed) < len(chunk):
            break
    return bytes(got)


def tool_command(tool: str, port: int, version: str) -> list[str]:
    """The command line of a CLI client connecting to 127.0.0.1:port with version."""
    if tool == "openssl":
        return [
            "openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-quiet",
            f"-tls1_{version[-1]}",
        ]  # fmt: skip
    if tool == "gnutls-cli":
        return [
            "gnutls-cli", "--insecure", "--logfile=/dev/null", "-p", str(port),
            f"--priority=NORMAL:-VERS-ALL:+VERS-TLS{version}", "127.0.0.1",
        ]  # fmt: skip
    if tool == "socat":
        return ["socat", "-", f"OPENSSL:127.0.0.1:{port},verify=0"]
    if tool == "ncat":
        return ["ncat", "--ssl", "127.0.0.1", str(port)]
    raise ValueError(tool)


def echo_through_tool(command: list[str], payload: bytes, env: dict[str, str]) -> bytes:
    """Feed payload to the tool's stdin and read as many bytes back from its stdout,
    then end the tool (its stdin stays open: EOF handling differs between tools)."""
    proc = subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    stdin = proc.stdin

    def feed() -> None:
        with contextlib.suppress(OSError):  # the tool is ended once the echo is in
            stdin.write(payload)
            stdin.flush()

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    got = bytearray()
    deadline = time.monotonic() + WAIT_S
    fd = proc.stdout.fileno()
    try:
        while len(got) < len(payload):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                break
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            got += chunk
    finally:
        proc.kill()
        proc.wait(WAIT_S)
        writer.join(WAIT_S)
        with contextlib.suppress(OSError):
            stdin.close()
        proc.stdout.close()
    return bytes(got)
