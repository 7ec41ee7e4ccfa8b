# Set-up and the two commands of the README. Everything lives in $(VENV).
PYTHON ?= python3
VENV ?= .venv
# A pinned CPU torch is installed before the project, so an open requirement never pulls a CUDA build.
TORCH ?= torch==2.13.0
EXTRAS ?= spconv,dev
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# glibc's dynamic mmap threshold can double a convolution's time in a fresh process; pin it
# (32 MiB, glibc's largest allowed value) wherever something is timed.
TIMING_ENV := MALLOC_MMAP_THRESHOLD_=33554432

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

demo: $(STAMP)
	$(TIMING_ENV) $(PY) -m sparse_hetconv demo

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
