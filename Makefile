# Every target installs what it needs into .venv first (a fresh machine needs nothing else).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: install demo clean-demo demo-pretrained test test-all bench bench-quick clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,serve]'
	touch $(STAMP)

install: $(STAMP)

## The main job on the built-in (synthetic) dataset: baseline + every encoder, then Table 3.
## Finished runs are kept: run it again to reprint the report, `make clean-demo` to start over.
demo: install
	$(BIN)/sicot ablate --recipe recipes/demo.toml

clean-demo:
	rm -rf runs/ablate-demo data/demo.h5 data/demo.recipe.json

## The demo from a pretrained visual stream, as the paper starts from ImageNet (docs/demo-pretraining.md):
## pretrain on 400 other synthetic products (~7 min), then baseline vs bilinear, 3 seeds (~9 min),
## at the baseline's step size with the title embedding batch-normalised. Re-running continues.
demo-pretrained: install
	test -f data/demo-pretrain.h5 || $(BIN)/sicot prepare --recipe recipes/demo-pretrain.toml
	test -f runs/demo-pretrain/summary.json || $(BIN)/sicot train --recipe recipes/demo-pretrain.toml --run-dir runs/demo-pretrain --resume
	$(BIN)/sicot ablate --recipe recipes/demo.toml --seeds 0,1,2 --encoders bilinear --out runs/ablate-demo-pretrained-bn \
		model.pretrained=runs/demo-pretrain train.normalize_loss=true model.semantic_norm=batchnorm

## The default test suite (fast; no slow/gpu/dist-slow tests).
test: install
	$(BIN)/python -m pytest -q -m "not slow and not gpu" $(PYTEST_ARGS)

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
