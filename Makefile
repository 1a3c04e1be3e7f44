# stargzfs developer tasks. CI runs `make test` (through .ci/run) on a fresh Debian 12 machine,
# so every target installs what it needs itself.
#
#   make demo         local registry + the fixture image pushed and read back
#   make test         system deps, venv, lint, types, full test suite
#   make check        lint + types only
#   make test-quick   tests without the `slow` marker
#   make clean        caches and build leftovers (make distclean: the venv too)

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

PY          ?= python3
VENV        ?= .venv
BIN         := $(VENV)/bin
STAMP       := $(VENV)/.stargzfs-installed
LINT_PATHS  := stargzfs tests scripts
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help deps venv compile check lint types test test-quick demo clean distclean

help:
	@sed -n 's/^#   //p' $(firstword $(MAKEFILE_LIST))

# -- setup -----------------------------------------------------------------------------------
deps:
	scripts/install-system-deps.sh

$(BIN)/python: | deps
	$(PY) -m venv $(VENV)

# Reinstall only when pyproject.toml (or the pyfuse3 patch) is newer than the stamp. pyfuse3
# comes first, patched (scripts/build-pyfuse3.sh): the kernel then opens files itself.
$(STAMP): pyproject.toml scripts/build-pyfuse3.sh scripts/pyfuse3-3.5.0.patch | deps $(BIN)/python
	scripts/build-pyfuse3.sh $(BIN)/python
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[test]'
	touch $@

# Byte-compile the package once: with PYTHONDONTWRITEBYTECODE (set on these machines) every
# `stargzfs` process, and each mount's daemon, would compile it anew (~0.1 s per start).
# Python revalidates the .pyc files against the sources, so stale ones are harmless.
compile: $(STAMP)
	$(BIN)/python -m compileall -q stargzfs

venv: $(STAMP) compile

# -- checks ----------------------------------------------------------------------------------
lint: venv
	$(BIN)/ruff check $(LINT_PATHS)

types: venv
	$(BIN)/mypy --strict stargzfs

check: lint types

# pytest exits 5 when it collected nothing: that fails the target like any other failure.
test: check
	$(BIN)/pytest $(PYTEST_ARGS)

test-quick: venv
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

demo: deps
	scripts/demo.sh

# -- cleanup ---------------------------------------------------------------------------------
clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache .hypothesis build *.egg-info $(STAMP)
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
