# bertforge: `make demo` sets everything up and runs the main job; `make test` passes the tests.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= configs/demo.yaml
TORCH_CPU_VERSION ?= 2.13.0
export DS_ACCELERATOR ?= cpu

.PHONY: setup demo test test-all lint clean bench

# A venv with the pinned dependencies. torch: keep a CUDA build if one is importable,
# otherwise install the CPU wheel pinned here (a bare `torch` would pull a multi-GB CUDA build).
$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	if $(BIN)/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then \
		echo "keeping the installed CUDA torch"; \
	else \
		$(BIN)/pip install -q torch==$(TORCH_CPU_VERSION); \
	fi
	$(BIN)/pip install -q -e '.[test]'
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/python scripts/demo.py --config $(CONFIG)

test: setup
	$(BIN)/python -m pytest -m "not gpu" tests

# Benchmarks (bench/): attention alone, a training step, the data loader -> bench/results/*.json,
# BENCHMARKS.md and PNGs. Long (tens of minutes on 2 CPU cores); needs the peers of the `bench` extra.
bench: setup
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python bench/attention.py
	$(BIN)/python bench/train_step.py
	$(BIN)/python bench/loader.py

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf runs data/demo $(VENV)
