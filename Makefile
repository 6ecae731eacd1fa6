# One virtual environment per checkout; every target installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: help install test export bench bench-core demo-weights demo-accuracy clean

.PHONY: cpp cpp-asan cpp-deps cpp-test

help:
	@echo "make export   run the default export recipe (installs dependencies first)"
	@echo "make test     run the test suite (installs dependencies first; builds and checks the C++ runtime)"
	@echo "make cpp      build the C++ runtime (cpp/) into build/cpp; make cpp-deps installs its Debian packages (root)"
	@echo "make bench    latency/FLOPs/accuracy benchmark -> benchmarks/results/<host>/ (BENCH=full for the long sweep)"
	@echo "make bench-core     speed of extraction and transfer on cached logits"
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

# The C++ runtime (cpp/): a release build and an AddressSanitizer/UBSan build; the Python tests
# drive both binaries (tests/cpp/), and fail rather than skip when these variables say they exist.
CPP_BUILD      ?= build/cpp
CPP_ASAN_BUILD ?= build/cpp-asan
ORT_SDK        ?= build/ort-sdk
# AUTO: the onnxruntime backend is built if its headers were fetched; ON (CI): it must be.
CPP_ORT        ?= AUTO
CPP_JOBS       ?= 2
CPP_TEST_ENV = TRANSMITER_CPP_BUILD=$(abspath $(CPP_BUILD)) TRANSMITER_CPP_ASAN_BUILD=$(abspath $(CPP_ASAN_BUILD)) \
               TRANSMITER_CPP_ORT=$(CPP_ORT)

test: $(STAMP) cpp cpp-asan
	$(CPP_TEST_ENV) $(PY) -m pytest -q

cpp-deps:
	bash cpp/scripts/install_deps.sh

$(ORT_SDK)/usr/include/onnxruntime/onnxruntime_cxx_api.h:
	bash cpp/scripts/fetch_onnxruntime_headers.sh $(ORT_SDK) || \
	    { [ "$(CPP_ORT)" != ON ] && echo "no ONNX Runtime headers: the onnxruntime backend is not built"; }

# Needs the venv: CMake asks its Python where the onnxruntime wheel keeps libonnxruntime.so.
cpp: $(STAMP) $(ORT_SDK)/usr/include/onnxruntime/onnxruntime_cxx_api.h
	cmake -S cpp -B $(CPP_BUILD) -DCMAKE_BUILD_TYPE=Release -DTRANSMITER_WITH_ONNXRUNTIME=$(CPP_ORT) \
	    -DONNXRUNTIME_ROOT=$(abspath $(ORT_SDK)) -DPython3_EXECUTABLE=$(abspath $(PY)) >/dev/null
	cmake --build $(CPP_BUILD) -j$(CPP_JOBS)

# The fuzz test and the CLI checks run on this build; ONNX Runtime itself is not instrumented,
# so this build leaves that backend out.
cpp-asan:
	cmake -S cpp -B $(CPP_ASAN_BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo -DTRANSMITER_SANITIZE=ON \
	    -DTRANSMITER_WITH_ONNXRUNTIME=OFF -DTRANSMITER_WITH_TENSORRT=OFF >/dev/null
	cmake --build $(CPP_ASAN_BUILD) -j$(CPP_JOBS)
	cd $(CPP_ASAN_BUILD) && ctest --output-on-failure

cpp-test: $(STAMP) cpp cpp-asan
	$(CPP_TEST_ENV) $(PY) -m pytest -q tests/cpp

RECIPE ?= export/recipes/demo.yaml

export: $(STAMP)
	$(VENV)/bin/transmiter export $(RECIPE)

BENCH ?= quick

bench: $(STAMP)
	$(VENV)/bin/transmiter bench --profile $(BENCH)

bench-core: $(STAMP)
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
