# The two commands a new user runs: `make demo` and `make test`. Both create .venv first.
# torch==2.13.0 is installed before anything else, so no later install can pull another (multi-GB
# CUDA) build: every other requirement accepts the torch that is already there.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.lmforge-installed
DEMO_STAMP := $(VENV)/.lmforge-demo-installed
TORCH  ?= torch==2.13.0
DEMO   ?= demo_out

.PHONY: demo test lint format docs bench clean install llama-cpp

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# `make test` installs the test extra (every optional extra, exercised); `make demo` only what
# the demo uses (transformers and gguf, to check its exported model), so that it starts sooner.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $(STAMP) $(DEMO_STAMP)

$(DEMO_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[demo]"
	touch $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/python scripts/demo.py --out $(DEMO)

# Two tests at a time (pytest-xdist): most of them wait on a child process's start-up. A module
# marked xdist_group runs on one worker, so its module fixtures are built once.
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup

lint: $(STAMP)
	$(BIN)/ruff format --check src tests bench scripts
	$(BIN)/ruff check src tests bench scripts

format: $(STAMP)
	$(BIN)/ruff format src tests bench scripts
	$(BIN)/ruff check --fix src tests bench scripts

# The README's command reference, from the parser (tests/test_cli.py checks they agree).
docs: $(STAMP)
	$(BIN)/python scripts/cli_reference.py

bench: $(STAMP)
	$(BIN)/python bench/loss_memory.py
	$(BIN)/python bench/generate_speed.py

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache .ruff_cache

# llama.cpp as the real client of our GGUF export (compiles llama.cpp: ~7-13 min on 2 cores, once;
# pip keeps the wheel). After `make demo` it also checks the demo's GGUF answers like lmforge.
# Not part of `make test`; the GGUF test skips cleanly without it.
llama-cpp: $(STAMP)
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/python -m pip install gguf llama-cpp-python
	$(BIN)/python -m pytest tests/test_export.py -m slow -k llama_cpp -q
