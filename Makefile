# The two commands: `make run` sets up a fresh Debian 12 machine and runs the demo,
# `make test` sets it up and runs every check. Both are idempotent.
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test setup lint typecheck pytest bench clean

setup:
	@scripts/setup.sh

run: setup
	@$(BIN)/python scripts/demo.py

lint: setup
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts

typecheck: setup
	$(BIN)/mypy

pytest: setup
	$(BIN)/pytest tests

test: lint typecheck pytest

bench: setup
	$(BIN)/python bench/runtime_vs_runc.py

clean:
	rm -rf $(VENV) build src/*.egg-info .mypy_cache .ruff_cache .pytest_cache
