# Two commands on a fresh clone: `make serve` (or `make serve-random` with no model
# hub) sets up and runs the service; `make test` sets up and runs every test.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch, from local disk here; a bare `torch` would pull CUDA.
TORCH_CPU := torch==2.13.0
RANDOM_WEIGHTS := .cache/random/esm2_t6_8M_UR50D.pt

.PHONY: setup serve serve-random test lint protos bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_CPU)
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
