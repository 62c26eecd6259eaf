# The two README commands: `make demo` and `make test`. Both create or update
# .venv from pyproject.toml first, so nothing else is needed on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: venv test lint demo bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/pytest

demo: venv
	$(BIN)/velox demo

bench: venv
	$(BIN)/python -m benchmarks.kernels --check

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
