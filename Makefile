# Two commands on a fresh clone: `make serve` (or `make serve-random` with no model
# hub) sets up (torch, the server and worker extras; no dev tools) and runs the service;
# `make test` sets up and runs every test, the Node and Go clients' included (it installs
# Debian's protoc and Go packages, and the Node client's npm packages).

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# torch, the CPU build by default. PyPI's Linux wheel of torch is the multi-GB CUDA build,
# so it comes from PyTorch's CPU index, unless pip is configured with an index or wheel
# folder of its own (a company mirror; our build machines, which reach nothing else):
# then that configuration decides. TORCH_INDEX picks another build, e.g. for a CUDA machine
#   make setup TORCH_INDEX=https://download.pytorch.org/whl/cu128
# or TORCH_INDEX=default for pip's own index as configured (PyPI: its CUDA 13 build).
TORCH := torch==2.13.0
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
PIP_HAS_INDEX = $(shell $(PYTHON) -m pip config list 2>/dev/null | grep -E '(index-url|find-links)=')
TORCH_INDEX ?= $(if $(PIP_HAS_INDEX),default,$(TORCH_CPU_INDEX))
TORCH_INDEX_OPTION = $(if $(filter default,$(TORCH_INDEX)),,--index-url $(TORCH_INDEX))
RANDOM_WEIGHTS := .cache/random/esm2_t6_8M_UR50D.pt

# What the tests need beyond Python: protoc, and Go with Debian's gRPC and protobuf
# libraries (the Go client builds offline from them); Node.js for the Node client.
DEBIAN_PACKAGES := protobuf-compiler golang-go golang-google-grpc-dev \
	golang-google-protobuf-dev protoc-gen-go protoc-gen-go-grpc
DEBIAN_STAMP := .cache/debian-packages.installed
NODE_DIR := client/node
NODE_STAMP := $(NODE_DIR)/node_modules/.installed
BUF := $(NODE_DIR)/node_modules/.bin/buf
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: setup setup-serve setup-dev serve serve-random test test-images lint protos bench clean

# An editable install makes setuptools warn "Editable installation ... Please be careful
# with folders in your working directory": nothing to act on here, so it is silenced.
PIP_EDITABLE := PYTHONWARNINGS="ignore:Editable installation" $(BIN)/pip install -q -e
SERVE_HINT := in another terminal: .venv/bin/esm2 status (or source .venv/bin/activate, then esm2 ...)

# What `make serve` needs: torch, the server and the worker extras.
$(BIN)/.installed-serve: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_INDEX_OPTION) $(TORCH)
	$(PIP_EDITABLE) '.[server,worker]'
	touch $@

# Everything: the service and the dev extra (pytest, ruff, the tests' other tools).
$(BIN)/.installed: $(BIN)/.installed-serve
	$(PIP_EDITABLE) '.[server,worker,dev]'
	touch $@

setup-serve: $(BIN)/.installed-serve

setup: $(BIN)/.installed

$(DEBIAN_STAMP):
	@missing=$$(for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	command -v npm >/dev/null || missing="$$missing nodejs npm"; \
	if [ -n "$$missing" ]; then \
	  command -v apt-get >/dev/null || { echo "install first (Debian names):" $$missing; exit 1; }; \
	  echo "installing Debian packages:" $$missing; \
	  $(SUDO) apt-get update -q && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi
	mkdir -p $(@D) && touch $@

$(NODE_STAMP): $(NODE_DIR)/package-lock.json | $(DEBIAN_STAMP)
	cd $(NODE_DIR) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

# The service needs only `setup-serve`; the tests also need `setup` and these.
setup-dev: setup $(DEBIAN_STAMP) $(NODE_STAMP)

serve: setup-serve
	@echo "$(SERVE_HINT)"
	$(BIN)/esm2 serve $(ARGS)

$(RANDOM_WEIGHTS): | setup-serve
	$(BIN)/esm2 make-checkpoint --random $@

serve-random: $(RANDOM_WEIGHTS)
	@echo "$(SERVE_HINT)"
	$(BIN)/esm2 serve --weights $(RANDOM_WEIGHTS) $(ARGS)

lint: setup-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python protos/generate.py --check
	$(BUF) lint protos
	$(BUF) breaking protos --against protos/v1-baseline.json

test: lint
	$(BIN)/python -m pytest -q $(ARGS)

# The three images of deploy/docker built and run for real (Compose, two CPU workers).
# Needs a Docker daemon it can reach or start (as root: no bridge, no iptables); installs
# Debian's docker.io, mmdebstrap (base images without a registry) and docker-compose where
# it can; where no daemon can run, the tests are skipped with the reason printed.
# ESM2_SKIP_GPU_IMAGE=1 leaves out the GPU worker's image (a 3 GB download).
# Builds are bounded by their own timeout (harness.build), not by pytest's per-test one.
IMAGE_PACKAGES := docker.io mmdebstrap docker-compose
test-images: setup-dev
	@missing=$$(for p in $(IMAGE_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  echo "installing Debian packages:" $$missing; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi
	ESM2_TEST_IMAGES=1 $(BIN)/python -m pytest -q -rs -o timeout_func_only=true tests/images $(ARGS)

# Regenerates every client's code from protos/ (tests fail while any is stale).
protos: setup-dev
	$(BIN)/python protos/generate.py
	$(BUF) generate protos --template client/go/buf.gen.yaml --path protos/esm2/v1 -o client/go
	$(BUF) generate protos --template $(NODE_DIR)/buf.gen.yaml --path protos/esm2/v1 -o $(NODE_DIR)

# The bench extra: OpenVINO and ONNX Runtime, timed beside our engine.
bench: setup
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m bench $(ARGS)

clean:
	rm -rf $(VENV) .cache *.egg-info .pytest_cache .ruff_cache $(NODE_DIR)/node_modules $(NODE_DIR)/dist
