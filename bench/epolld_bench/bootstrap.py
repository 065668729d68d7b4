"""Compiling the C and Go programs, making the TLS certificate and creating the bench venv
when they are missing or stale."""

from __future__ import annotations

import contextlib
import os
import resource
import shlex
import shutil
import subprocess
import sys
from typing import Any

from .paths import BENCH, BIN, GO_BUILD, ROOT, RUST_BUILD, TLS_CERT, TLS_DIR, TLS_KEY, VENV, VENV_PY

C_PROGRAMS = ("loadgen", "echo_server", "udpgen", "udp_echo_server")
# Go programs, the standard library only: its binary's name -> its source files, built as
# one package main (the echo servers share servers/go/echoloop.go: accept and copy loops).
GO_PROGRAMS = {
    "tlsload": ("tlsload.go",),
    "echo_tls": ("servers/go/echo_tls.go", "servers/go/echoloop.go"),
    "echo_go": ("servers/go/echo.go", "servers/go/echoloop.go"),
}
# The Rust programs: a cargo package under bench/servers/ -> its binary's name.
RUST_PROGRAMS = {"echo_tokio": "servers/rust"}
# Debian 12's own cargo and rustc, whatever else PATH holds (a rustup toolchain, say): the
# crates are Debian's (librust-*-dev), built for that compiler.
DEBIAN_CARGO, DEBIAN_RUSTC = "/usr/bin/cargo", "/usr/bin/rustc"
RUST_PACKAGES = ("cargo", "rustc", "librust-tokio-dev")


def sh(argv: list[str], **kwargs: Any) -> None:
    print("+", shlex.join(argv), flush=True)
    subprocess.run(argv, check=True, **kwargs)


def bootstrap(need_venv: bool = True) -> None:
    """Compile bench/*.c into bench/out/bin/, create bench/.venv, raise RLIMIT_NOFILE."""
    if shutil.which("gcc") is None:
        sh([str(ROOT / "packaging" / "dev" / "apt-install"), "gcc", "libc6-dev"])
    BIN.mkdir(parents=True, exist_ok=True)
    for name in C_PROGRAMS:
        src, exe = BENCH / f"{name}.c", BIN / name
        if not exe.exists() or exe.stat().st_mtime < src.stat().st_mtime:
            sh(["gcc", "-O2", "-Wall", "-Wextra", "-o", str(exe), str(src)])
    _build_go()
    _build_rust()
    for tool, package in (("openssl", "openssl"), ("socat", "socat"), ("ncat", "ncat")):
        if shutil.which(tool) is None:  # the TLS baselines and the certificate
            sh([str(ROOT / "packaging" / "dev" / "apt-install"), package])
    _make_certificate()
    if need_venv:
        reqs = (BENCH / "requirements.txt").read_text()
        stamp = VENV / ".requirements"
        if not (stamp.exists() and stamp.read_text() == reqs):
            if not VENV_PY.exists():
                sh([sys.executable, "-m", "venv", str(VENV)])
            sh(
                [
                    str(VENV_PY),
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "-r",
                    str(BENCH / "requirements.txt"),
                ]
            )
            stamp.write_text(reqs)
    # Every server and load generator inherits the hard limit as its soft limit: the scale
    # workloads need all of it (20,000 on these machines, not raisable).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, hard), hard))


def _build_go() -> None:
    """go build each of GO_PROGRAMS with Debian's golang-go: offline (GOPROXY=off, the local
    toolchain only), its caches under bench/out/go."""
    if shutil.which("go") is None:
        sh([str(ROOT / "packaging" / "dev" / "apt-install"), "golang-go"])
    env = {
        **os.environ,
        "GOCACHE": str(GO_BUILD / "cache"),
        "GOPATH": str(GO_BUILD / "path"),
        "GOTOOLCHAIN": "local",
        "GOPROXY": "off",
        "GOFLAGS": "",
        "CGO_ENABLED": "0",
    }
    for name, files in GO_PROGRAMS.items():
        sources, exe = [BENCH / f for f in files], BIN / name
        if exe.exists() and all(exe.stat().st_mtime >= s.stat().st_mtime for s in sources):
            continue
        sh(["go", "build", "-o", str(exe), *map(str, sources)], env=env)


def _build_rust() -> None:
    """cargo build --release --offline each of RUST_PROGRAMS with Debian's cargo, its only
    source Debian's packaged crates (a directory source replacing crates.io in a CARGO_HOME
    of its own under bench/out/cargo), its target directory bench/out/rust."""
    sh([str(ROOT / "packaging" / "dev" / "apt-install"), *RUST_PACKAGES])
    home = RUST_BUILD / "home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        "# Written by bench/epolld_bench/bootstrap.py: Debian's crates only, offline.\n"
        '[source.crates-io]\nreplace-with = "debian"\n'
        '[source.debian]\ndirectory = "/usr/share/cargo/registry"\n'
        "[net]\noffline = true\n"
    )
    env = {
        **os.environ,
        "CARGO_HOME": str(home),
        "CARGO_TARGET_DIR": str(RUST_BUILD / "target"),
        "RUSTC": DEBIAN_RUSTC,  # not a rustup proxy that PATH may find first
    }
    for name, package in RUST_PROGRAMS.items():
        sources = [BENCH / package / "Cargo.toml", *(BENCH / package / "src").glob("*.rs")]
        exe = BIN / name
        if exe.exists() and all(exe.stat().st_mtime >= s.stat().st_mtime for s in sources):
            continue
        manifest = str(BENCH / package / "Cargo.toml")
        sh([DEBIAN_CARGO, "build", "--release", "--offline", "--manifest-path", manifest], env=env)
        shutil.copy2(RUST_BUILD / "target" / "release" / name, exe)


def _make_certificate() -> None:
    """A self-signed ECDSA P-256 certificate for 127.0.0.1, the one every TLS server uses."""
    if TLS_CERT.exists() and TLS_KEY.exists():
        return
    TLS_DIR.mkdir(parents=True, exist_ok=True)
    sh(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(TLS_KEY), "-out", str(TLS_CERT), "-days", "3650",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        stderr=subprocess.DEVNULL,
    )  # fmt: skip


def nofile_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
