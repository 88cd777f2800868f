#!/usr/bin/env bash
# The report pipeline on CPU, end to end, then `star-elastic report`:
#
#   parent (stdlib, make demo's) -> arithmetic fine-tune -> importance (widths and layers)
#     -> train-elastic (elastic=tiny_depth: S keeps fewer layers) -> slice -> generate, all
#     nine think/answer pairs over L/M/S, on the elastic checkpoint in narrow compute and on
#     the slices -> qad fp8 / nvfp4 (when the qad recipe is installed) -> REPORT.md
#
# Every stage writes under $ROOT (default runs/report) and resumes from its own checkpoints
# when run again; the report is $ROOT/REPORT.md with its PNGs beside it. About 18 minutes on
# 2 shared CPU cores with OMP_NUM_THREADS=1 and the defaults below, plus about 3 minutes when
# the stdlib parent must be trained first (SIZE=smoke: about 2 minutes, to check the wiring).
# One intra-op thread per process is the safer setting when other jobs share the cores: a
# second thread then mostly waits for the first.
#
# Environment:
#   ROOT=runs/report        where every stage's run directory goes
#   PARENT=runs/demo/parent a train-parent run on the stdlib corpus; trained first if missing
#   SIZE=full|smoke         training lengths and the number of test prompts
#   QAD=auto|0|1            run the qad stages (auto: when `star-elastic qad` exists)
#   SE=.venv/bin/star-elastic
set -euo pipefail

ROOT=${ROOT:-runs/report}
PARENT=${PARENT:-runs/demo/parent}
SIZE=${SIZE:-full}
QAD=${QAD:-auto}
SE=${SE:-.venv/bin/star-elastic}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
export WANDB_MODE=${WANDB_MODE:-offline}

case "$SIZE" in
  full)
    FINETUNE=(train.steps=1500)
    CURRICULUM=(curriculum.stages.0.steps=300 curriculum.stages.1.steps=200)
    TEST=200 QAD_STEPS=60 PARENT_STEPS=1200 ;;
  smoke)
    FINETUNE=(train.steps=60 train.eval_interval=30 train.save_interval=30)
    CURRICULUM=(curriculum=smoke elastic_train.eval_interval=4)
    TEST=16 QAD_STEPS=4 PARENT_STEPS=60 ;;
  *) echo "SIZE must be full or smoke, not $SIZE" >&2; exit 2 ;;
esac
DATA=(data=arithmetic "data.arithmetic.test_examples=$TEST")
ELASTIC=(elastic=tiny_depth)  # the depth axis: S skips layers, so its latency saving can show
PAIRS=("generation.pair_budgets=[L,M,S]")

stage() { echo; echo "=== $* ==="; }

if [ ! -f "$PARENT/summary.json" ]; then
  stage "parent on the stdlib corpus: $PARENT"
  "$SE" train-parent "run.dir=$PARENT" "train.steps=$PARENT_STEPS" logger=none
fi

stage "fine-tune the parent on arithmetic"
"$SE" train-parent "${DATA[@]}" train=arithmetic_tiny "train.init_from=$PARENT" \
  "${FINETUNE[@]}" "run.dir=$ROOT/parent" logger=none

stage "importance"
"$SE" importance "${DATA[@]}" "parent.dir=$ROOT/parent" "run.dir=$ROOT/importance"

stage "elastic training"
"$SE" train-elastic "${DATA[@]}" "${ELASTIC[@]}" "${CURRICULUM[@]}" "source.dir=$ROOT/importance" \
  "run.dir=$ROOT/elastic" logger=none

stage "slices"
"$SE" slice "${DATA[@]}" "${ELASTIC[@]}" "source.dir=$ROOT/elastic" "run.dir=$ROOT/slices"

for kind in elastic slices; do
  stage "budget control on the $kind: every think -> answer pair over L, M, S"
  compute=(elastic.compute=narrow)  # the elastic checkpoint skips the layers S drops
  if [ "$kind" = slices ]; then compute=(); fi
  "$SE" generate "${DATA[@]}" "${ELASTIC[@]}" "${compute[@]}" generation=arithmetic \
    "${PAIRS[@]}" "source.dir=$ROOT/$kind" "source.kind=$kind" "run.dir=$ROOT/generate_$kind"
done

if [ "$QAD" = auto ]; then
  recipes=$("$SE" --help)
  if grep -q '^  qad ' <<<"$recipes"; then QAD=1; else QAD=0; fi
fi
if [ "$QAD" = 1 ]; then
  for format in fp8 nvfp4; do
    stage "QAD $format"
    "$SE" qad "${DATA[@]}" "${ELASTIC[@]}" "quant=$format" "qad_train.steps=$QAD_STEPS" \
      "source.dir=$ROOT/elastic" "run.dir=$ROOT/qad_$format"
  done
fi

stage "report"
"$SE" report "run.dir=$ROOT"
