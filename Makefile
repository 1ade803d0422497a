# One-word entry points. Each target installs what it needs into .venv first.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck check proto bench soak adversarial adversarial-fuzz adversarial-crash clean

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

CRASH_REPORT := $(CURDIR)/.adversarial-crash.jsonl

FUZZ_REPORT := $(CURDIR)/.adversarial-fuzz.json
LEAK_REPORT := $(CURDIR)/.adversarial-leak.status
FLOOD_REPORT := $(CURDIR)/.adversarial-flood.json

# Every part runs even when one fails; the last line sums them all (tests/adversarial.py).
adversarial: $(STAMP)  ## fuzz, crash suite, leak scan, unauthenticated flood at full size; one line
	@rm -f $(FUZZ_REPORT) $(CRASH_REPORT) $(LEAK_REPORT) $(FLOOD_REPORT)
	-@$(MAKE) -k --no-print-directory adversarial-fuzz adversarial-crash
	-@$(BIN)/pytest tests/test_leak_scan.py -q -p no:cacheprovider; echo $$? > $(LEAK_REPORT)
	-@$(BIN)/python -m bench.flood $(FLOOD_REPORT)
	@$(BIN)/python -m tests.adversarial $(FUZZ_REPORT) $(CRASH_REPORT) $(LEAK_REPORT) $(FLOOD_REPORT)

# Every RPC of node and broker (signed and unsigned) and the HTCDS readers, hypothesis "full"
# profile (tests/fuzzkit.py); the last line counts requests fuzzed, INTERNAL replies, crashes.
adversarial-fuzz: $(STAMP)
	TESSERA_FUZZ=full TESSERA_FUZZ_REPORT=$(FUZZ_REPORT) $(BIN)/pytest tests/test_fuzz*.py \
		-q -p no:cacheprovider -o timeout=1800

adversarial-crash: $(STAMP)  ## SIGKILL nodes and brokers many times (TESSERA_CRASH=full); one summary line
	@rm -f $(CRASH_REPORT)
	@TESSERA_CRASH=full TESSERA_CRASH_REPORT=$(CRASH_REPORT) $(BIN)/pytest tests/test_crash_suite.py \
		-q -p no:cacheprovider -o timeout=1800; status=$$?; \
		$(BIN)/python -m tests.crashsupport $(CRASH_REPORT); exit $$status

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
