# Two commands set everything up on a fresh machine (Python 3.11 + pip): `make fit`, `make test`.
# Each target bootstraps .venv once and re-installs only when pyproject.toml changes.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= experiments/base.yaml
PRESET ?= cpu
export OMP_NUM_THREADS ?= 2

.PHONY: fit test test-slow study bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

fit: $(STAMP)
	$(BIN)/python -m tagmoe_lit fit --config $(CONFIG)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow --durations=0

# The ablation study (docs/results.md): resumable, rerun to continue; PRESET=gpu on a CUDA machine.
study: $(STAMP)
	$(BIN)/python -m tagmoe_lit study --preset experiments/study/$(PRESET).yaml

bench: $(STAMP)
	$(BIN)/python benchmarks/moe_dispatch.py
	$(BIN)/python benchmarks/train_step.py

clean:
	rm -rf runs lightning_logs .pytest_cache
