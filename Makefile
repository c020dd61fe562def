# sketchsearch: `make run` sets up and runs the main job on embedded defaults; `make test` runs the tests.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-stamp
DATA ?= ../shared/data

.PHONY: setup run test lint bench clean

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[train,dev]'
	touch $(STAMP)

setup: $(STAMP)

# The main job: evaluate the shipped model on the Sketchy-layout data in $(DATA) (no network, no training).
run: $(STAMP)
	$(BIN)/sketchsearch eval $(DATA)/sketchy100 --json .cache/eval-sketchy100.json

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not gpu" --timeout=900

lint: $(STAMP)
	$(BIN)/ruff check encoder services worker tests bench
	$(BIN)/mypy encoder services worker
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) .cache
