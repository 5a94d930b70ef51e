# The README's two commands: `make demo` and `make test`. Each sets up what it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test check clean

demo: $(VENV)/.demo-installed
	$(BIN)/edgeagent demo

test: $(VENV)/.dev-installed
	PATH="$(abspath $(BIN)):$$PATH" .ci/check

$(VENV)/bin/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "edgeagent needs Python >= 3.11 (set PYTHON=python3.11 or newer)"; exit 1; }
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  echo "creating a venv failed: installing python3-venv"; \
	  $(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y python3-venv && $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.demo-installed: pyproject.toml $(VENV)/bin/python
	$(BIN)/pip install -q -e '.[demo]'
	@touch $@

$(VENV)/.dev-installed: pyproject.toml $(VENV)/bin/python
	$(BIN)/pip install -q -e '.[dev,demo]'
	@touch $@ $(VENV)/.demo-installed

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
