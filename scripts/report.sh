#!/usr/bin/env bash
# The report pipeline on CPU, end to end, then `star-elastic report`:
#
#   parent (stdlib, make demo's) -> arithmetic fine-tune -> importance (widths and layers)
#     -> train-elastic (elastic=tiny_depth: S keeps fewer layers) -> slice -> generate, all
#     nine think/answer pairs over L/M/S, on the elastic checkpoint in narrow compute and on
#     the slices, each pair timed again in interleaved rounds -> the same elastic run without
#     its second curriculum stage (equal tokens) and its own-budget accuracies
#     -> bench/report_comparisons.py (every budget distilled alone at equal tokens, width vs
#     depth at equal parameters, a second held-out corpus) -> qad fp8 / nvfp4 (when the qad
#     recipe is installed; held-out loss and task accuracy of every budget) -> REPORT.md
#
# Every stage writes under $ROOT (default runs/report) and resumes from its own checkpoints
# when run again; the report is $ROOT/REPORT.md with its PNGs beside it. On 2 CPU cores shared
# with other jobs (load 6 to 50) the full size took about 45 minutes with the stdlib parent
# (docs/report/REPORT.md's run section); SIZE=smoke checks the wiring in about 10 minutes.
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
    FINETUNE=(train.steps=1500 train.eval_interval=300 train.save_interval=300)
    S1=150 S2=100 SEQ1=128 CURRICULUM=(curriculum=tiny)
    TEST=48 COMPARE_PROMPTS=24 ROUNDS=3 TIMED=4 QAD_STEPS=60 PARENT_STEPS=600 ;;
  smoke)
    FINETUNE=(train.steps=60 train.eval_interval=30 train.save_interval=30)
    S1=4 S2=4 SEQ1=64 CURRICULUM=(curriculum=smoke elastic_train.eval_interval=4)
    TEST=16 COMPARE_PROMPTS=8 ROUNDS=2 TIMED=2 QAD_STEPS=4 PARENT_STEPS=60 ;;
  *) echo "SIZE must be full or smoke, not $SIZE" >&2; exit 2 ;;
esac
DATA=(data=arithmetic "data.arithmetic.test_examples=$TEST")
ELASTIC=(elastic=tiny_depth)  # the depth axis: S skips layers, so its latency saving can show
PAIRS=("generation.pair_budgets=[L,M,S]")
CURRICULUM+=("curriculum.stages.0.steps=$S1" "curriculum.stages.1.steps=$S2")
# stage 2 replaced by more of stage 1 (its sequence length, uniform draws), equal tokens:
# stage 2's sequence is twice stage 1's, so twice the steps at the same batch
STAGE1_ONLY=("curriculum.stages.1.name=stage1_more" "curriculum.stages.1.seq_length=$SEQ1"
  "curriculum.stages.1.budget_probs=[]" "curriculum.stages.1.steps=$((2 * S2))")
TIMING=("generation.timing_rounds=$ROUNDS" "generation.timing_prompts=$TIMED")
PY=${PY:-$(dirname "$SE")/python}

mkdir -p "$ROOT"
STAGE_TIMES="$ROOT/stage_times.tsv"
: >"$STAGE_TIMES"
stage() {  # each stage's start time and the 1-minute load, for the report's run section
  echo; echo "=== $* ==="
  printf '%s\t%s\t%s\n' "$(date +%s)" "$(cut -d' ' -f1 /proc/loadavg)" "$*" >>"$STAGE_TIMES"
}

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
    "${PAIRS[@]}" "${TIMING[@]}" "source.dir=$ROOT/$kind" "source.kind=$kind" \
    "run.dir=$ROOT/generate_$kind"
done

stage "elastic training without stage 2 (stage 1 continued, equal tokens)"
"$SE" train-elastic "${DATA[@]}" "${ELASTIC[@]}" "${CURRICULUM[@]}" "${STAGE1_ONLY[@]}" \
  "source.dir=$ROOT/importance" "run.dir=$ROOT/elastic_stage1_only" logger=none
"$SE" generate "${DATA[@]}" "${ELASTIC[@]}" elastic.compute=narrow generation=arithmetic \
  "${PAIRS[@]}" generation.pair_grid=same generation.think_budget=L generation.answer_budget=L \
  "source.dir=$ROOT/elastic_stage1_only" source.kind=elastic "run.dir=$ROOT/generate_stage1_only"

stage "every budget distilled alone at equal tokens; width vs depth; a second corpus"
"$PY" bench/report_comparisons.py "$ROOT/elastic" "$ROOT/comparisons" "$COMPARE_PROMPTS"

if [ "$QAD" = auto ]; then
  recipes=$("$SE" --help)
  if grep -q '^  qad ' <<<"$recipes"; then QAD=1; else QAD=0; fi
fi
if [ "$QAD" = 1 ]; then
  for format in fp8 nvfp4; do
    stage "QAD $format"
    "$SE" qad "${DATA[@]}" "${ELASTIC[@]}" "quant=$format" "qad_train.steps=$QAD_STEPS" \
      generation=arithmetic "qad_train.task_prompts=$COMPARE_PROMPTS" \
      "source.dir=$ROOT/elastic" "run.dir=$ROOT/qad_$format"
  done
fi

stage "report"
"$SE" report "run.dir=$ROOT"
