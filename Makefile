# make demo   — the embedded default on CPU: tiny hybrid parent on the stdlib corpus, then
#               importance ranking + reorder, elastic training (router + KD, 2 stages), then
#               a standalone slice of every budget, then NVFP4 PTQ + QAD of the elastic model
# make test   — the test suite (unit, 2-rank gloo, resume)
# make lint   — ruff (lint + format check) and mypy
# make test-nemo — the NeMo export tests in their own venv (.venv-nemo: nemo-toolkit 2.7.3
#               cannot share .venv; first build about 2 min and 2.9 GB)
# Each target creates .venv when it is missing.

VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp
RUN_DIR ?= runs/demo
export OMP_NUM_THREADS ?= 2
export WANDB_MODE ?= offline

.PHONY: demo test test-gpu test-nemo lint bench bench-demo report clean slurm-deps

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,slurm]'
	@touch $(STAMP)

# nemo-toolkit 2.7.3 [llm] needs four fixes on top of its own pins (docs/cpu-compat.md)
NEMO_VENV  ?= .venv-nemo
NEMO_PY    := $(NEMO_VENV)/bin/python
NEMO_STAMP := $(NEMO_VENV)/.installed-stamp
NEMO_FIXES := 'pyarrow<22' nemo-run 'leptonai==0.27.3' 'protobuf~=5.29.5' 'packaging<25'

$(NEMO_STAMP): pyproject.toml
	@test -x $(NEMO_PY) || python3 -m venv $(NEMO_VENV)
	$(NEMO_PY) -m pip install -q --upgrade pip
	$(NEMO_PY) -m pip install -q torch==2.13.0
	$(NEMO_PY) -m pip install -q -e '.[nemo]' 'pytest>=8' 'pytest-timeout>=2.3'
	$(NEMO_PY) -m pip install -q $(NEMO_FIXES)
	@touch $(NEMO_STAMP)

test-nemo: $(NEMO_STAMP)
	$(NEMO_PY) -m pytest -q -p no:cacheprovider -rs tests/export/test_nemo_export.py

demo: $(STAMP)
	$(VENV)/bin/star-elastic train-parent run.dir=$(RUN_DIR)/parent
	$(VENV)/bin/star-elastic importance parent.dir=$(RUN_DIR)/parent run.dir=$(RUN_DIR)/importance
	$(VENV)/bin/star-elastic train-elastic source.dir=$(RUN_DIR)/importance run.dir=$(RUN_DIR)/elastic
	$(VENV)/bin/star-elastic slice source.dir=$(RUN_DIR)/elastic run.dir=$(RUN_DIR)/slices
	$(VENV)/bin/star-elastic qad quant=nvfp4 source.dir=$(RUN_DIR)/elastic run.dir=$(RUN_DIR)/qad

# make report — the report pipeline on CPU (about 30 min on 2 cores; scripts/report.sh): the demo
#               parent (trained first when missing) fine-tuned on generated arithmetic with
#               <think> traces, importance, elastic training with a depth axis, slices, all nine
#               think->answer pairs over L/M/S (timed in interleaved rounds) on the elastic
#               checkpoint (narrow) and on the slices, the run without stage 2, every budget
#               distilled alone, width vs depth, a second held-out corpus, QAD fp8/nvfp4, then
#               runs/report/REPORT.md + PNGs
REPORT_DIR ?= runs/report

report: $(STAMP)
	OMP_NUM_THREADS=1 ROOT=$(REPORT_DIR) PARENT=$(RUN_DIR)/parent SE=$(VENV)/bin/star-elastic scripts/report.sh

# make bench — the ratio suite (bench/suite.py -> bench/results.json, bench/RESULTS.md), CPU,
#               a few minutes; make bench-demo — the quality benches on the demo's runs
bench: $(STAMP)
	$(PY) bench/suite.py
	$(PY) bench/pipeline.py

bench-demo: $(STAMP)
	$(PY) bench/slice_quality.py $(RUN_DIR)/parent
	$(PY) bench/separate_vs_elastic.py $(RUN_DIR)/elastic

# tests/slurm start a real one-node Slurm; install it when missing and apt is there (as root).
slurm-deps:
	@command -v slurmctld >/dev/null || (command -v apt-get >/dev/null && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge) || true

test: $(STAMP) slurm-deps
	$(PY) -m pytest -q -p no:cacheprovider -rs --durations=30 -m 'not nemo and not gpu' tests

# the GPU tier (tests/gpu, marker gpu): FP8 GEMMs through torch._scaled_mm; needs CUDA
test-gpu: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -rs -m gpu tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

clean:
	rm -rf runs outputs wandb .pytest_cache
