# The two commands a new user needs: `make run` and `make test`.
# Both create .venv and install epolld into it on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
CONSTRAINTS := tests/constraints-debian12.txt
PYTEST_ARGS ?=

.PHONY: run test test-fast check lint bench bench-quick soak chaos deb image clean

run: $(STAMP)
	$(BIN)/epolld --config etc/epolld.yaml

# Every test: unit, real-process and (as root) the systemd container and Debian package tests.
test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Everything but the container tests.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not system" $(PYTEST_ARGS)

check: $(STAMP)
	$(BIN)/epolld --check-config --config etc/epolld.yaml

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || packaging/dev/apt-install python3-venv
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) -e '.[test]'
	touch $@

bench: $(STAMP)
	bench/run --full

bench-quick: $(STAMP)
	bench/run --quick

# One daemon under mixed traffic, reloads and signals; fails on any error or leak.
SOAK_S ?= 600
soak: $(STAMP)
	$(BIN)/python -m tests.soak --seconds $(SOAK_S)

# The fault campaign (root): restarts, kills, a sick journal, a bad network, stuck peers.
# CHAOS_S: seconds of load in each restart scenario (the others run a fifth of it).
CHAOS_S ?= 600
chaos: $(STAMP)
	$(BIN)/python -m tests.chaos --seconds $(CHAOS_S)

deb:
	@packaging/dev/build-deb

# The OCI image from Debian 12's packages (as root): podman's localhost/epolld:VERSION and
# dist/epolld_VERSION_ARCH.oci.tar. ARCH=arm64 builds another architecture under qemu.
ARCH ?= $(shell dpkg --print-architecture)
image:
	@packaging/image/build-image --arch $(ARCH)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
