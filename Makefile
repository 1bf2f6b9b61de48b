# Every target installs what it needs into .venv first (a fresh machine needs nothing else).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: install demo demo-long-tail clean-demo readme test lint test-all bench bench-quick clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,serve]'
	touch $(STAMP)

install: $(STAMP)

## The main job on the built-in (synthetic) dataset, as the paper runs it: the visual stream starts
## from a pretrained one (the paper: ImageNet; here 400 OTHER synthetic products, recipes/demo-pretrain.toml),
## then the baseline + every encoder with the default co-training (docs/presets.md), then Tables 2-4.
## Finished steps are kept: run it again to reprint the report, `make clean-demo` to start over.
DEMO_SEEDS ?= 0
demo: install
	test -f data/demo-pretrain.h5 || $(BIN)/sicot prepare --recipe recipes/demo-pretrain.toml
	test -f runs/demo-pretrain/summary.json || $(BIN)/sicot train --recipe recipes/demo-pretrain.toml --run-dir runs/demo-pretrain --resume
	$(BIN)/sicot ablate --recipe recipes/demo.toml --seeds $(DEMO_SEEDS) model.pretrained=runs/demo-pretrain

## The long-tail methods beside SICoT on the same demo (docs/long-tail.md): re-balanced losses and
## samplers, second stages on a finished run, each alone and with the bilinear encoder; the CE runs
## and the pretraining are those of `make demo` when it ran first (DEMO_SEEDS=0,1,2: ~21 min on 2 cores).
LONG_TAIL_METHODS ?= ce,cb-sampler,la-loss,balanced-softmax,ldam-drw,crt,tau-norm,lws,posthoc-la,posthoc-la(tau=1)
demo-long-tail: install
	test -f data/demo-pretrain.h5 || $(BIN)/sicot prepare --recipe recipes/demo-pretrain.toml
	test -f runs/demo-pretrain/summary.json || $(BIN)/sicot train --recipe recipes/demo-pretrain.toml --run-dir runs/demo-pretrain --resume
	$(BIN)/sicot ablate --recipe recipes/demo.toml --seeds $(DEMO_SEEDS) --encoders bilinear \
		--methods '$(LONG_TAIL_METHODS)' --out runs/lt-demo model.pretrained=runs/demo-pretrain

## README's result tables, rewritten from the run directories that produced them (make demo,
## DEMO_SEEDS=0,1,2 make demo); `python -m benchmarks.readme --check` only compares.
readme: install
	$(BIN)/python -m benchmarks.readme

clean-demo:
	rm -rf runs/ablate-demo runs/lt-demo runs/demo-pretrain data/demo.h5 data/demo.recipe.json data/demo-pretrain.h5 data/demo-pretrain.recipe.json

## The default test suite (fast; no slow/gpu/dist-slow tests), after the house checks: ruff (lint
## and format) and the import layers of docs/architecture.md (import-linter, pyproject.toml).
test: install lint
	$(BIN)/python -m pytest -q -m "not slow and not gpu" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

## Everything, the slow tests included.
test-all: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

## The benchmark suite (docs/benchmarks.md): results in benchmarks/results/<name>-<device>.json.
## BENCH_ARGS passes options, e.g. BENCH_ARGS="--device cpu --threads 1".
bench: install
	$(BIN)/python -m benchmarks all $(BENCH_ARGS)

bench-quick: install
	$(BIN)/python -m benchmarks all --quick $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
