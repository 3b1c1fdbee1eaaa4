# The two set-up commands of the README:
#   make demo   # build everything in .venv, then train the demo (nano model, demo dataset, CPU)
#   make test   # build everything in .venv, then run the test suite
# TORCH_SPEC picks the torch build: the default is the CPU wheel; on a GPU machine use e.g.
#   make test TORCH_SPEC=torch
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
STAMP := $(VENV)/.olmoearth_fast-installed

.PHONY: demo test bench install clean

install: $(STAMP)

$(STAMP): setup.py pyproject.toml requirements/test.txt requirements/reference.txt $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements/test.txt
	$(PY) -m pip install -q --no-deps -r requirements/reference.txt
	MAX_JOBS=2 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

demo: $(STAMP)
	$(PY) -m olmoearth_fast.train --demo

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m pytest benchmarks --benchmark-only -q

clean:
	rm -rf build $(VENV) olmoearth_fast/*.so *.egg-info
