# Quick start: `make demo` (the embedded default end to end) and `make test` (what CI runs).
# Both build .venv first. torch==2.13.0 is installed before the project so that pip never pulls a
# multi-GB CUDA build on CPU machines; on a GPU machine create .venv with your CUDA torch first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
NPROC ?= 2

.PHONY: venv browser demo test test-fast bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e ".[test,demo,plot]"
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	PATH="$(abspath $(VENV))/bin:$$PATH" NPROC=$(NPROC) bash scripts/demo.sh

# tests/test_report_html.py drives Debian's chromium through chromedriver (Selenium). `browser`
# installs both with apt-get when chromium or chromedriver is missing and this user can (root, or
# passwordless sudo); otherwise, or when apt-get fails, it says so and the test skips, except under
# CI=true, where the test fails (the browser test must run on the CI machine) and so does a failed
# apt-get here.
BROWSER_PACKAGES ?= chromium chromium-driver
BROWSER_APT = apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(BROWSER_PACKAGES)
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then exit 0; \
	elif [ "$$(id -u)" = 0 ]; then sh -c '$(BROWSER_APT)'; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo -n sh -c '$(BROWSER_APT)'; \
	else echo "make browser: cannot install $(BROWSER_PACKAGES) (apt-get needs root or passwordless sudo)" >&2; false; \
	fi || { echo "make browser: chromium / chromedriver missing: the browser test skips (fails under CI=true)" >&2; \
	        case "$${CI:-}" in ""|0|false|no) ;; *) exit 1;; esac; }

test: $(VENV)/.installed browser
	$(PY) -m pytest -q -ra

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -ra -m "not slow and not multirank"

bench: $(VENV)/.installed
	PATH="$(abspath $(VENV))/bin:$$PATH" PY=$(abspath $(PY)) bash benchmarks/run_all.sh

clean:
	rm -rf $(VENV) .pytest_cache
