#!/usr/bin/env bash
# A tiny hybrid trained by train-elastic at sequence 8192 (a handful of steps), with its peak
# memory: parent (stdlib slice) -> importance -> train-elastic with a two-stage curriculum at
# SEQ tokens (micro-batch 1, chunked KD, SDPA attention without an s x s mask).
#
# Peak memory is the train-elastic process's peak resident set size (GNU time's "Maximum
# resident set size"), and the same for a process that only imports the libraries, so the
# difference is what the run itself added. Too slow for CI (minutes on 2 CPU cores); the test
# suite runs the same recipe at short sequences.
#
# Environment: ROOT=runs/longseq  SEQ=8192  STEPS=3  SE=.venv/bin/star-elastic
set -euo pipefail

ROOT=${ROOT:-runs/longseq}
SEQ=${SEQ:-8192}
STEPS=${STEPS:-3}
SE=${SE:-.venv/bin/star-elastic}
PY=${PY:-$(dirname "$SE")/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export WANDB_MODE=${WANDB_MODE:-offline}
DATA=("data.cache_dir=$ROOT/data" "data.max_files=60" "data.name=stdlib_small")

if [ ! -d "$ROOT/parent/checkpoints" ]; then
  "$SE" train-parent "run.dir=$ROOT/parent" "${DATA[@]}" logger=none train.micro_batch_size=4 \
    train.seq_length=64 train.warmup_steps=2 train.eval_batches=2 train.steps=60 \
    train.eval_interval=30 train.save_interval=60
fi
if [ ! -d "$ROOT/importance/checkpoints" ]; then
  "$SE" importance "parent.dir=$ROOT/parent" "run.dir=$ROOT/importance" "${DATA[@]}" \
    importance.calib_batches=4 importance.seq_length=64
fi

STAGES="[{name: s1_${SEQ}, seq_length: ${SEQ}, steps: ${STEPS}, lr: 1.0e-4},"
STAGES+=" {name: s2_${SEQ}, seq_length: ${SEQ}, steps: ${STEPS}, budget_probs: [0.5, 0.3, 0.2], lr: 1.0e-4}]"
rm -rf "$ROOT/elastic"
/usr/bin/time -v "$SE" train-elastic "source.dir=$ROOT/importance" "run.dir=$ROOT/elastic" \
  "${DATA[@]}" logger=none "curriculum.stages=$STAGES" model.max_sequence_length="$SEQ" \
  elastic_train.micro_batch_size=1 elastic_train.eval_batches=1 elastic_train.eval_seq_length=256 \
  elastic_train.eval_interval=1000 elastic_train.warmup_steps=1 elastic_train.log_interval=1 \
  2> "$ROOT/elastic_time.txt"
/usr/bin/time -v "$PY" -c "from megatron_ext.compat import ensure_compat; ensure_compat(); import megatron_ext.elastic.trainer, recipes.train_elastic" \
  2> "$ROOT/import_time.txt"
run=$(grep "Maximum resident" "$ROOT/elastic_time.txt" | awk '{print $NF}')
base=$(grep "Maximum resident" "$ROOT/import_time.txt" | awk '{print $NF}')
echo "train-elastic at seq $SEQ: peak RSS $((run / 1024)) MiB, imports alone $((base / 1024)) MiB," \
  "run's own $(((run - base) / 1024)) MiB" | tee "$ROOT/peak_memory.txt"
