# modelpress: `make run` (set up and run the main job) and `make test`.
# Everything is installed into .venv; torch is pinned to the CPU build first (an unpinned
# torch pulls several GB of CUDA). Re-running a target reinstalls only when pyproject changes.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
CONSTRAINTS := constraints.txt
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
PYTEST_ARGS ?=

.PHONY: install run test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(STAMP): pyproject.toml $(CONSTRAINTS) | $(PY)
	$(PIP) install -q -c $(CONSTRAINTS) "torch==2.13.0"
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[all]"
	touch $@

$(TEST_STAMP): $(STAMP)
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[all,test]"
	touch $@

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/modelpress run minilm

# The dashboard test drives Debian's chromium headless; it is installed once if missing (the
# test fixture does the same and skips with the reason where no package manager can).
CHROMIUM_INSTALL := command -v chromium >/dev/null || (command -v apt-get >/dev/null && (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) >/dev/null 2>&1) || true

test: $(TEST_STAMP)
	@$(CHROMIUM_INSTALL)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(TEST_STAMP)
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) .pytest_cache
