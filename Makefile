# The two commands a newcomer needs:  make demo   and   make test
.DEFAULT_GOAL := help
SHELL := /bin/bash

VENV ?= .venv
PY := $(VENV)/bin/python

# Python 3.12 may be installed through pyenv without being on PATH: try PATH
# first (and check that it really runs: a pyenv shim can exist and fail),
# then pyenv's own versions directory.
PYTHON312 ?= $(shell \
	for c in python3.12 \
	         "$$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12 \
	         "$$HOME"/.pyenv/versions/3.12*/bin/python3.12 \
	         /usr/local/bin/python3.12 /usr/bin/python3.12; do \
	  if "$$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; then \
	    command -v "$$c" 2>/dev/null || echo "$$c"; break; fi; \
	done)

.PHONY: help venv test demo clean

help:
	@echo "make demo   # train a small Megatron-Core MoE on the CPU: loss-free vs aux loss"
	@echo "make test   # create .venv (Python 3.12), install, run the tests"

$(VENV)/.installed: pyproject.toml requirements/ci.txt
	@test -n "$(PYTHON312)" || { echo "error: Python 3.12 not found (PATH or pyenv); megatron-core 0.19 needs it" >&2; exit 1; }
	$(PYTHON312) -m venv $(VENV)
	@# torch is pinned: a bare range would pull another build.
	$(PY) -m pip install --quiet -r requirements/ci.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m ruff check .
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: venv
	$(VENV)/bin/nemo-lossfree demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache

# Further targets (patches-check, slurm, ...), one file per topic.
-include mk/*.mk
