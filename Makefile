# Two entry points: `make run` (install and run the all-in-one daemon) and `make test`
# (install everything the tests need, then run the whole suite: unit, integration and
# end-to-end tests with a real Bazel, plus ruff). Nothing else is required on a fresh machine.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: run test install install-test system-deps lint protos bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q -e .

install-test: $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'

system-deps:
	./scripts/install-system-deps.sh

run: install
	$(BIN)/reexecd serve $(ARGS)

lint: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

test: system-deps install-test lint
	$(BIN)/pytest -q -ra

protos: install-test
	$(BIN)/python scripts/gen_protos.py

bench: install-test
	for b in bench/bytestream.py bench/find_missing.py bench/small_blobs.py bench/get_action_result.py; do \
		$(BIN)/python $$b || exit 1; done
