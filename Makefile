# One-word entry points. Each target installs what it needs into .venv first.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck check proto bench adversarial clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "Tessera needs $(PYTHON) on PATH"; exit 3; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)  ## run the whole system on this machine
	$(BIN)/tessera demo

test: $(STAMP)  ## run the test suite
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck test

proto: $(STAMP)  ## regenerate tessera/v1 from proto/
	$(BIN)/python proto/generate.py

adversarial: $(STAMP)  ## fuzz every RPC and the HTCDS readers at the full profile (long)
	TESSERA_FUZZ=full $(BIN)/pytest tests/test_fuzz*.py -q -p no:cacheprovider

bench: $(STAMP)  ## run every benchmark, print ratios against same-run baselines
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
