# Two commands on a fresh clone: `make serve` (or `make serve-random` with no model
# hub) sets up and runs the service; `make test` sets up and runs every test.

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

.PHONY: setup serve serve-random test lint protos bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_INDEX_OPTION) $(TORCH)
	$(BIN)/pip install -q -e '.[server,worker,dev]'
	touch $@

setup: $(BIN)/.installed

serve: setup
	$(BIN)/esm2 serve $(ARGS)

$(RANDOM_WEIGHTS): | setup
	$(BIN)/esm2 make-checkpoint --random $@

serve-random: $(RANDOM_WEIGHTS)
	$(BIN)/esm2 serve --weights $(RANDOM_WEIGHTS) $(ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python protos/generate.py --check

test: lint
	$(BIN)/python -m pytest -q $(ARGS)

protos: setup
	$(BIN)/python protos/generate.py

bench: setup
	$(BIN)/python -m bench $(ARGS)

clean:
	rm -rf $(VENV) .cache *.egg-info .pytest_cache .ruff_cache
