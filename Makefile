# Two entry points for a fresh machine: `make run` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# The CPU build of PyTorch, pinned: an unpinned torch pulls several GB of CUDA wheels.
TORCH   := torch==2.13.0

.PHONY: run test lint clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/simulate --hw fpga_8core.yaml --model 1.3b

test: $(STAMP)
	$(BIN)/ruff check simulator workloads hwconfigs tests benchmarks
	$(BIN)/pytest
	$(BIN)/simulate regress

lint: $(STAMP)
	$(BIN)/ruff check simulator workloads hwconfigs tests benchmarks

clean:
	rm -rf $(VENV) build dist *.egg-info
