# dispatcher: the two commands of the README, and the rest of the developer loop.
# Needs only Python 3.11+ (and make): everything else is installed into .venv.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
CONFIG ?= config.example.toml
PYTEST_ARGS ?=

.PHONY: demo test lint typecheck unit bench soak clean install

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

## The main job on the embedded default (SQLite, simulator channels, no credentials):
## validate, list the plan, then rehearse the whole Quality Month on a virtual clock.
demo: $(STAMP)
	$(BIN)/dispatcher check $(CONFIG)
	$(BIN)/dispatcher plan $(CONFIG)
	$(BIN)/dispatcher rehearse $(CONFIG)

## Lint, type-check and the whole test suite (CI runs this through .ci/run).
test: lint typecheck
	$(BIN)/pytest -n 2 -q -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check dispatcher tests bench
	$(BIN)/ruff format --check dispatcher tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

## The long variants of the reliability tests.
soak: $(STAMP)
	$(BIN)/pytest -q -m slow $(PYTEST_ARGS)

## Benchmarks: run by hand, never timed assertions. Writes bench/RESULTS.md (medians of 3 runs;
## PostgreSQL scale-out only with DISPATCHER_TEST_PG_URL set). `BENCH_ARGS=--quick` for a smoke check.
BENCH_ARGS ?=
bench: $(STAMP)
	$(BIN)/python bench/run_all.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
