# Quick start: `make run` (set up, then answer a question about the demo video) and
# `make test` (set up, then run the tests). Setup makes .venv when absent; it installs
# torch 2.13.0 (a CPU build) only when no torch is importable, so a Jetson's or a CUDA
# machine's own torch is left alone (the venv sees system packages).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.m4-installed

.PHONY: setup run test demo-bundle clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

run: setup
	$(VENV)/bin/m4 run --video demo --prompt "Which way does the cyan circle move?" --max-new-tokens 8

# two workers, each on one thread (tests/conftest.py), keep both cores of a small machine busy;
# a file's tests run on one worker, in order, sharing its fixtures
test: setup
	$(PY) -m pytest -q -n 2 --dist loadgroup

# the shipped demo bundle (m4/assets/demo-bundle), exported again from the shipped checkpoint
demo-bundle: setup
	$(PY) scripts/ship_demo.py --bundle

clean:
	rm -rf $(VENV) build *.egg-info
