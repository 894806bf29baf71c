# Quick start: `make demo` (the embedded default end to end) and `make test` (what CI runs).
# Both build .venv first. torch==2.13.0 is installed before the project so that pip never pulls a
# multi-GB CUDA build on CPU machines; on a GPU machine create .venv with your CUDA torch first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
NPROC ?= 2

.PHONY: venv demo test test-fast bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e ".[test,demo,plot]"
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	PATH="$(abspath $(VENV))/bin:$$PATH" NPROC=$(NPROC) bash scripts/demo.sh

test: $(VENV)/.installed
	$(PY) -m pytest -q -ra

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -ra -m "not slow and not multirank"

bench: $(VENV)/.installed
	PATH="$(abspath $(VENV))/bin:$$PATH" PY=$(abspath $(PY)) bash benchmarks/run_all.sh

clean:
	rm -rf $(VENV) .pytest_cache
