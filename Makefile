# One virtual environment per checkout; every target installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: help install test export bench demo-weights demo-accuracy clean

help:
	@echo "make export   run the default export recipe (installs dependencies first)"
	@echo "make test     run the test suite (installs dependencies first)"
	@echo "make bench    run the core speed benchmark"
	@echo "make demo-weights   retrain the demo world's CLIP models from scratch into DEMO_WEIGHTS (~17 min on 2 cores)"
	@echo "make demo-accuracy  the method's accuracy table and checks on the demo world (DEMO_WEIGHTS=dir)"
	@echo "make clean    remove the virtual environment and caches"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@# torch/torchvision first and pinned: the project's machines install this pair from local disk.
	$(PY) -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

RECIPE ?= export/recipes/demo.yaml

export: $(STAMP)
	$(VENV)/bin/transmiter export $(RECIPE)

bench: $(STAMP)
	$(PY) benchmarks/bench_core.py

# The shipped weights live in transmiter_deploy/demo/weights; regenerating writes elsewhere by
# default so that a retrain never replaces them by accident (DEMO_WEIGHTS=transmiter_deploy/demo/weights does).
DEMO_WEIGHTS ?= build/demo-weights
SHIPPED_DEMO_WEIGHTS := transmiter_deploy/demo/weights

demo-weights: $(STAMP)
	$(PY) -m transmiter_deploy.demo.train --out $(DEMO_WEIGHTS)

# Accuracy of the shipped weights unless DEMO_WEIGHTS is given on the command line.
demo-accuracy: $(STAMP)
	$(PY) benchmarks/demo_accuracy.py --weights $(if $(filter command line,$(origin DEMO_WEIGHTS)),$(DEMO_WEIGHTS),$(SHIPPED_DEMO_WEIGHTS)) \
	    --json benchmarks/results/demo_accuracy.json --markdown benchmarks/results/demo_accuracy.md

clean:
	rm -rf $(VENV) .pytest_cache
