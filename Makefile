# The two commands a new user runs: `make demo` and `make test`. Both create .venv first.
# torch==2.13.0 is installed before anything else, so no later install can pull another (multi-GB
# CUDA) build: every other requirement accepts the torch that is already there.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.lmforge-installed
TORCH  ?= torch==2.13.0
DEMO   ?= demo_out

.PHONY: demo test lint format bench clean install llama-cpp

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m lmforge.demo --out $(DEMO)

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

format: $(STAMP)
	$(BIN)/ruff format src tests bench

bench: $(STAMP)
	$(BIN)/python bench/loss_memory.py
	$(BIN)/python bench/generate_speed.py

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache .ruff_cache
