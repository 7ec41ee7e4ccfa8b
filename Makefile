# Set-up and the two commands of the README. Everything lives in $(VENV).
PYTHON ?= python3
VENV ?= .venv
# A pinned CPU torch is installed before the project, so an open requirement never pulls a CUDA build.
TORCH ?= torch==2.13.0
EXTRAS ?= spconv,deploy,dev
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# glibc's dynamic mmap threshold can double a convolution's time in a fresh process; pin it
# (32 MiB, the largest value every glibc accepts) wherever something is timed. Its trim threshold
# likewise: left at 128 KiB, freed activations are handed back to the kernel and faulted in again
# (a masked HetConv layer measured 3.2x slower). The benchmark also pins both itself (mallopt).
TIMING_ENV := MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824

.PHONY: install demo test bench reproduce gpu-check clean

install: $(STAMP)

# The package is built against the torch installed first (--no-build-isolation: pip would otherwise
# fetch a second torch to build with), which compiles the operator's CPU kernels (sparse_hetconv/csrc,
# about a minute; without a C++ compiler the package installs without them and says so).
$(STAMP): pyproject.toml setup.py $(wildcard sparse_hetconv/csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip "setuptools>=77" wheel
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet --no-build-isolation -e ".[$(EXTRAS)]"
	$(PY) -m sparse_hetconv.backends
	touch $@

demo: $(STAMP)
	$(TIMING_ENV) $(PY) -m sparse_hetconv demo

# One pytest worker per core (pytest-xdist; TEST_WORKERS=0 runs in this process).
TEST_WORKERS ?= auto

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS)

# Latency and memory of every HetConv form, then the deployment benchmark (ONNX Runtime, OpenVINO,
# int8), then torch.compile against eager at P = 2..64 (benchmarks/compiled.py, 1.5 min); about
# 22 min in all on 2 cores (BENCH_ARGS=--quick: the first in under 6 min). Writes
# benchmarks/results/ (JSON as results come in, markdown, plots) and regenerates docs/performance.md.
bench: $(STAMP)
	$(TIMING_ENV) $(PY) -m benchmarks.bench $(BENCH_ARGS)
	$(TIMING_ENV) $(PY) -m benchmarks.deploy $(BENCH_ARGS)
	$(TIMING_ENV) $(PY) -m benchmarks.compiled

# The paper's accuracy-vs-P table on Fashion-MNIST (apt-get install dataset-fashion-mnist): VGG-16 at
# P = 1..64, 3 seeds at P = 1 and 4, the three forms at P = 4, the conversion and deployment chain;
# about two hours on 2 cores, resumable (runs already in benchmarks/results/reproduce.json are skipped).
# Writes that JSON, docs/reproduce.md and notebooks/05_reproduce.ipynb. REPRODUCE_ARGS=--quick: minutes; --short: the whole plan on fewer images and epochs (about 35 min).
reproduce: $(STAMP)
	$(TIMING_ENV) $(PY) -m benchmarks.reproduce $(REPRODUCE_ARGS)

# GPU readiness of the triton backend (about 8 min on one H200): the CUDA tests, then VGG-16 timings
# of every form and per-layer triton vs FLOP-ideal. Runs with the GPU machine's own python (torch,
# triton, pytest, hypothesis); writes gpu_check.json and gpu_check.md to $$OUT or benchmarks/results/gpu.
GPU_PYTHON ?= python3

gpu-check:
	PYTHONPATH=. $(GPU_PYTHON) -m benchmarks.gpu_check --out $${OUT:-benchmarks/results/gpu} $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
