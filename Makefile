# One-word entry points. Each target installs what it needs into .venv first.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck check proto bench soak clean

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

bench: $(STAMP)  ## run every benchmark, print ratios against same-run baselines
	$(BIN)/python -m bench

# Full size (issue 16): 1,000 agencies each holding a Receive stream, 12,000 referrals between
# random pairs, statistics rounds meanwhile; SOAK_POSTGRES=1 also runs it on PostgreSQL.
SOAK_STREAMS ?= 1000
SOAK_REFERRALS ?= 12000
SOAK_POSTGRES ?= 0
soak: $(STAMP)  ## a bounded soak of one broker: throughput, latency, memory per stream, RSS over time
	TESSERA_SOAK_STREAMS=$(SOAK_STREAMS) TESSERA_SOAK_REFERRALS=$(SOAK_REFERRALS) \
		TESSERA_SOAK_POSTGRES=$(SOAK_POSTGRES) $(BIN)/python -m bench soak

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
