# One virtual environment per checkout; every target installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: help install test export bench clean

help:
	@echo "make export   run the default export recipe (installs dependencies first)"
	@echo "make test     run the test suite (installs dependencies first)"
	@echo "make bench    run the core speed benchmark"
	@echo "make clean    remove the virtual environment and caches"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch/torchvision first, pinned, so pip takes the builds on local disk.
	$(PY) -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

export: $(STAMP)
	$(VENV)/bin/transmiter export

bench: $(STAMP)
	$(PY) benchmarks/bench_core.py

clean:
	rm -rf $(VENV) .pytest_cache
