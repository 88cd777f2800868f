# make demo   — the embedded default on CPU: tiny hybrid parent on the stdlib corpus, then
#               importance ranking + reorder, then zero-shot slices of every budget
# make test   — the test suite (unit, 2-rank gloo, resume)
# make lint   — ruff (lint + format check) and mypy
# Each target creates .venv when it is missing.

VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp
RUN_DIR ?= runs/demo
export OMP_NUM_THREADS ?= 2
export WANDB_MODE ?= offline

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/star-elastic train-parent run.dir=$(RUN_DIR)/parent
	$(VENV)/bin/star-elastic importance parent.dir=$(RUN_DIR)/parent run.dir=$(RUN_DIR)/importance
	$(VENV)/bin/star-elastic slice source.dir=$(RUN_DIR)/importance run.dir=$(RUN_DIR)/slices

bench: $(STAMP)
	$(PY) bench/slice_quality.py $(RUN_DIR)/parent

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

clean:
	rm -rf runs outputs wandb .pytest_cache
