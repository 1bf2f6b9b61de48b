# Every target installs what it needs into .venv first (a fresh machine needs nothing else).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install demo test test-all bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## The main job on the built-in (synthetic) dataset.
demo: install
	$(BIN)/sicot prepare --recipe recipes/demo.toml --force

## The default test suite (fast; no slow/gpu/dist-slow tests).
test: install
	$(BIN)/python -m pytest -q -m "not slow and not gpu" $(PYTEST_ARGS)

## Everything, the slow tests included.
test-all: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
