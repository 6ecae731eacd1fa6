# One virtual environment per checkout; every target installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: help install test export bench bench-core demo-weights demo-weights-large demo-accuracy demo-teachers clean

.PHONY: test-fast cpp cpp-asan cpp-asan-build cpp-asan-ctest cpp-deps cpp-test cpp-aarch64 cpp-aarch64-build \
        cpp-aarch64-ctest cpp-aarch64-deps

help:
	@echo "make export   run the default export recipe (installs dependencies first)"
	@echo "make test     run the test suite (installs dependencies first; builds and checks the C++ runtime)"
	@echo "make test-fast      the development loop: Python tests without C++ builds, clusters or slow cases"
	@echo "make cpp      build the C++ runtime (cpp/) into build/cpp; make cpp-deps installs its Debian packages (root)"
	@echo "make cpp-aarch64    cross-build it for aarch64 into build/cpp-aarch64 and run its ctest under qemu (make cpp-aarch64-deps: root)"
	@echo "make bench    latency/FLOPs/accuracy benchmark -> benchmarks/results/<host>/ (BENCH=full for the long sweep)"
	@echo "make bench-core     speed of extraction and transfer on cached logits"
	@echo "make demo-weights   retrain the demo world's CLIP models from scratch into DEMO_WEIGHTS (~17 min on 2 cores)"
	@echo "make demo-weights-large  train the larger upgrade target TM-Demo-Large alone, beside the shipped models"
	@echo "make demo-accuracy  the method's accuracy table and checks on the demo world (DEMO_WEIGHTS=dir)"
	@echo "make demo-teachers  the demo teacher as ONNX and as precomputed logits (export/teachers/), for"
	@echo "                    RECIPE=export/recipes/demo-onnx-teacher.yaml and demo-logits-teacher.yaml"
	@echo "make clean    remove the virtual environment and caches"

# uv installs the environment (72 s against pip's 335 s here: it unpacks and compiles in parallel),
# from the indexes pip is configured with (scripts/uv_pip_args.py says how and why). Bytecode is
# compiled at install: where PYTHONDONTWRITEBYTECODE is set (the project's machines set it), no
# interpreter writes it later, and every new one (a Ray worker, a child process) would compile what
# it imports again (`import ray, ray.data`: 4.3-5.5 s without, 2.4 s with). INSTALLER=pip installs
# with pip itself.
INSTALLER ?= uv
ifeq ($(INSTALLER),pip)
INSTALL_INSTALLER =
VENV_INSTALL = $(PY) -m pip install --quiet
else
INSTALL_INSTALLER = $(PY) -m pip install --quiet "uv>=0.9,<1"
VENV_INSTALL = $(VENV)/bin/uv pip install --quiet --compile-bytecode --python $(PY) $$($(PY) scripts/uv_pip_args.py)
endif

$(STAMP): pyproject.toml scripts/uv_pip_args.py
	$(PYTHON) -m venv $(VENV)
	$(INSTALL_INSTALLER)
	@# torch/torchvision first and pinned: the project's machines install this pair from local disk.
	$(VENV_INSTALL) "torch==2.14.1" "torchvision==0.29.1"
	$(VENV_INSTALL) -e ".[dev]"
	@# tritonserver (Python backend only) without its numpy<2 pin, and a NumPy 1 for its Python stub,
	@# which does not work with NumPy 2 (docs/serving.md)
	$(VENV_INSTALL) --no-deps "nvidia-pytriton==0.7.0"
	$(VENV_INSTALL) --no-deps --upgrade --target $(VENV)/triton-numpy "numpy>=1.26,<2"
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
# aarch64 (cpp/cmake/aarch64-linux-gnu.cmake): a release build with the onnxruntime backend (ONNX
# Runtime's aarch64 library from its PyPI wheel) and an ASan/UBSan build, their programs run under
# qemu-user. AUTO: built and tested where the cross compiler and qemu are installed; ON (CI): they
# must be; OFF: never.
CPP_AARCH64            ?= AUTO
CPP_AARCH64_BUILD      ?= build/cpp-aarch64
CPP_AARCH64_ASAN_BUILD ?= build/cpp-aarch64-asan
ORT_AARCH64            ?= build/ort-aarch64
AARCH64_TOOLCHAIN      := $(abspath cpp/cmake/aarch64-linux-gnu.cmake)
ifeq ($(CPP_AARCH64),AUTO)
CPP_AARCH64_ENABLED := $(if $(and $(shell command -v aarch64-linux-gnu-g++),$(shell command -v qemu-aarch64)),ON,OFF)
else
CPP_AARCH64_ENABLED := $(CPP_AARCH64)
endif
CPP_TEST_ENV = TRANSMITER_CPP_BUILD=$(abspath $(CPP_BUILD)) TRANSMITER_CPP_ASAN_BUILD=$(abspath $(CPP_ASAN_BUILD)) \
               TRANSMITER_CPP_ORT=$(CPP_ORT) \
               $(if $(filter ON,$(CPP_AARCH64_ENABLED)),TRANSMITER_CPP_AARCH64_BUILD=$(abspath $(CPP_AARCH64_BUILD)) \
                   TRANSMITER_CPP_AARCH64_ASAN_BUILD=$(abspath $(CPP_AARCH64_ASAN_BUILD)))
CPP_TARGETS = cpp cpp-asan $(if $(filter ON,$(CPP_AARCH64_ENABLED)),cpp-aarch64)

# make test: the whole suite in timed phases (scripts/phase.sh prints each phase's wall and CPU seconds, and CI's
# summary reads them from PHASE_LOG); make test lists pytest's 25 slowest tests. pytest runs every test outside
# tests/cpp while, on the other core, the C++ builds, their ctest and then tests/cpp in a pytest process of their
# own run beside it (scripts/test_suite.sh says why; their output goes to build/cpp-builds.log and
# build/cpp-tests.log, printed at the end).
PHASE := bash scripts/phase.sh
CPP_BUILD_TARGETS = cpp cpp-asan-build $(if $(filter ON,$(CPP_AARCH64_ENABLED)),cpp-aarch64-build)
CPP_CTEST_TARGETS = cpp-asan-ctest $(if $(filter ON,$(CPP_AARCH64_ENABLED)),cpp-aarch64-ctest)

# pytest's worker processes (pytest-xdist; 0: one process, the default) in each of make test's two pytest runs. With
# workers each test file runs whole on one of them (module fixtures made once) in the suite's order
# (--no-loadscope-reorder: the cluster tests last, conftest.run_order), and the session's exports are made once
# per run, by whichever process needs them first (tests/conftest.py: made_once). On this project's 2-core
# machine the default stays one: the C++ builds and tests/cpp already use the second core beside pytest, and
# measured on a clean clone (stop 37, tests/cpp still in the same process) pytest took 616 s with two workers
# and 718 s in the suite's order (the Ray and Triton tests beside each other and the builds: a tritonserver
# start timed out), against 605 s in one process; with tests/cpp in their own process (stop 38, builds already
# made) two workers beside it made the tritonserver of tests/test_triton.py abort while loading its models
# (boost::interprocess::lock_exception in Triton's Python backend). Machines with more cores: make test TEST_WORKERS=4.
TEST_WORKERS ?= 0

test:
	@$(PHASE) venv $(MAKE) --no-print-directory install
	@MAKE="$(MAKE)" CPP_BUILD_TARGETS="$(CPP_BUILD_TARGETS)" CPP_CTEST_TARGETS="$(CPP_CTEST_TARGETS)" \
	    bash scripts/test_suite.sh env $(CPP_TEST_ENV) $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25

# The development loop: no C++ builds, no live servers or clusters, no demo exports, no slow cases
# (markers in pyproject.toml, set in tests/conftest.py); make test stays the full suite.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not cluster and not demo_exports" --ignore=tests/cpp --durations=10

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
# so this build leaves that backend out. -O1 -g1: AddressSanitizer's recommended level, and line
# tables for its reports, at half RelWithDebInfo's build time.
cpp-asan:
	@$(MAKE) --no-print-directory cpp-asan-build
	@$(MAKE) --no-print-directory cpp-asan-ctest

cpp-asan-build:
	cmake -S cpp -B $(CPP_ASAN_BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g1" -DTRANSMITER_SANITIZE=ON \
	    -DTRANSMITER_WITH_ONNXRUNTIME=OFF -DTRANSMITER_WITH_TENSORRT=OFF >/dev/null
	cmake --build $(CPP_ASAN_BUILD) -j$(CPP_JOBS)

# the ctest targets run what the build targets built (make test times the two apart)
cpp-asan-ctest:
	cd $(CPP_ASAN_BUILD) && ctest --output-on-failure

cpp-test: $(STAMP) $(CPP_TARGETS)
	$(CPP_TEST_ENV) $(PY) -m pytest -q tests/cpp

cpp-aarch64-deps:
	bash cpp/scripts/install_deps.sh aarch64

# ctest runs each test program under qemu (the toolchain file sets CMAKE_CROSSCOMPILING_EMULATOR).
# LeakSanitizer needs ptrace, which qemu-user does not emulate: the emulated sanitizer build checks
# addresses and undefined behaviour, the native one leaks too. Only the programs the tests run are
# built (head_bench times the head: meaningless under emulation); the sanitizer build at -O1 -g1
# (line tables for reports) builds in 45 s and runs its ctest in 22 s, against 97 s and 51 s for
# RelWithDebInfo (measured on the 2-core machine).
AARCH64_TEST_PROGRAMS := transmiter_infer fuzz_formats bank_manifest
cpp-aarch64:
	@$(MAKE) --no-print-directory cpp-aarch64-build
	@$(MAKE) --no-print-directory cpp-aarch64-ctest

cpp-aarch64-build: $(STAMP) $(ORT_SDK)/usr/include/onnxruntime/onnxruntime_cxx_api.h
	@command -v aarch64-linux-gnu-g++ >/dev/null && command -v qemu-aarch64 >/dev/null || \
	    { echo "no aarch64 cross compiler or qemu-user: run make cpp-aarch64-deps (as root)" >&2; exit 3; }
	$(if $(filter OFF,$(CPP_ORT)),,PYTHON=$(abspath $(PY)) bash cpp/scripts/fetch_onnxruntime_aarch64.sh $(ORT_AARCH64))
	cmake -S cpp -B $(CPP_AARCH64_BUILD) -DCMAKE_TOOLCHAIN_FILE=$(AARCH64_TOOLCHAIN) -DCMAKE_BUILD_TYPE=Release \
	    -DTRANSMITER_WITH_ONNXRUNTIME=$(CPP_ORT) -DONNXRUNTIME_ROOT=$(abspath $(ORT_SDK)) \
	    -DONNXRUNTIME_LIBRARY="$$(ls $(abspath $(ORT_AARCH64))/libonnxruntime.so.* 2>/dev/null | tail -n 1)" >/dev/null
	cmake --build $(CPP_AARCH64_BUILD) -j$(CPP_JOBS) --target $(AARCH64_TEST_PROGRAMS) transmiter
	cmake -S cpp -B $(CPP_AARCH64_ASAN_BUILD) -DCMAKE_TOOLCHAIN_FILE=$(AARCH64_TOOLCHAIN) -DCMAKE_BUILD_TYPE=RelWithDebInfo \
	    -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g1" -DTRANSMITER_SANITIZE=ON -DTRANSMITER_WITH_ONNXRUNTIME=OFF \
	    -DTRANSMITER_WITH_TENSORRT=OFF >/dev/null
	cmake --build $(CPP_AARCH64_ASAN_BUILD) -j$(CPP_JOBS) --target $(AARCH64_TEST_PROGRAMS)

cpp-aarch64-ctest:
	cd $(CPP_AARCH64_BUILD) && ctest --output-on-failure
	cd $(CPP_AARCH64_ASAN_BUILD) && ASAN_OPTIONS=detect_leaks=0 ctest --output-on-failure

RECIPE ?= export/recipes/demo.yaml

export: $(STAMP)
	$(VENV)/bin/transmiter export $(RECIPE)

# The files the ONNX-teacher and precomputed-logits demo recipes read: demo.yaml's fine-tuned
# teacher written out by the project itself (docs/recipes.md, "Teachers").
DEMO_TEACHERS ?= export/teachers

demo-teachers: $(STAMP)
	$(VENV)/bin/transmiter teacher onnx export/recipes/demo.yaml --out $(DEMO_TEACHERS)/demo-teacher.onnx
	$(VENV)/bin/transmiter teacher logits export/recipes/demo.yaml --out $(DEMO_TEACHERS)/demo-teacher-logits.safetensors

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

# The larger upgrade target (TM-Demo-Large) trained alone, beside an unchanged copy of the shipped
# models (docs/upgrade.md); copy DEMO_WEIGHTS over the shipped folder to ship it.
demo-weights-large: $(STAMP)
	$(PY) -m transmiter_deploy.demo.train --add TM-Demo-Large --towers $(SHIPPED_DEMO_WEIGHTS) --out $(DEMO_WEIGHTS)

# Accuracy of the shipped weights unless DEMO_WEIGHTS is given on the command line.
demo-accuracy: $(STAMP)
	$(PY) benchmarks/demo_accuracy.py --weights $(if $(filter command line,$(origin DEMO_WEIGHTS)),$(DEMO_WEIGHTS),$(SHIPPED_DEMO_WEIGHTS)) \
	    --json benchmarks/results/demo_accuracy.json --markdown benchmarks/results/demo_accuracy.md

clean:
	rm -rf $(VENV) .pytest_cache
