"""The smallest budget: elastic training vs pruning and distilling it on its own, equal tokens.

(bench/report_comparisons.py does this for every budget, for the report.)

Usage: python bench/separate_vs_elastic.py [ELASTIC_RUN_DIR] (default runs/demo/elastic, a
``train-elastic`` run). Writes bench/separate_vs_elastic.json and prints a table.

The elastic run trains every budget in one model; the smallest budget (the last of
``elastic.budgets``) gets only the steps whose curriculum draw picked it. This bench counts
those steps by recomputing every draw (``sample_budget(stage.probs, curriculum.seed, stage,
step)``, as the trainer does) and compares three models at that budget's final router widths
(``budget_choices.json``), all on the run's held-out batches (``elastic_train`` eval size,
``run.seed``):

* zero-shot: the importance-ordered parent (``source.dir``) sliced to a plain smaller model;
* separate: that slice distilled alone from the frozen unsliced parent with the run's loss
  (``kd_loss``, its temperature, ``ce_weight``), optimizer (the training engine's Adam,
  ``elastic_train`` betas / weight decay / clipping), per-stage lr and linear warm-up (over
  its own steps), for exactly the counted steps, on exactly the batches those steps of the
  elastic run saw (each stage's iterator rebuilt with ``_stages``' seeds; the other budgets'
  batches are skipped): the same tokens as the budget's share;
* elastic: the run's checkpoint, converted elastic, evaluated at the same widths (and the
  ``val_loss`` of its ``summary.json`` beside it).

``difference`` is separate minus elastic held-out loss: positive means elastic training did
better for this budget at equal tokens. Runs in one process (a run at DP > 1 is replayed
with the whole global batch per step).
"""

from __future__ import annotations

from megatron_ext.compat import ensure_compat

ensure_compat()  # the entry point's shims, before megatron-core's model modules are imported

import json
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")


from megatron_ext.checkpoint import CheckpointManager  # noqa: E402
from megatron_ext.compat.engine import apply_engine_shims  # noqa: E402
from megatron_ext.config.compose import section  # noqa: E402
from megatron_ext.config.schema import DataConfig, RunConfig, TrainConfig  # noqa: E402
from megatron_ext.elastic.budget_eval import evaluate_at, load_choices  # noqa: E402
from megatron_ext.elastic.config import ElasticConfig  # noqa: E402
from megatron_ext.elastic.controller import ElasticController, StripeLayout  # noqa: E402
from megatron_ext.elastic.convert import convert_to_elastic  # noqa: E402
from megatron_ext.elastic.curriculum import CurriculumConfig  # noqa: E402
from megatron_ext.elastic.slice_run import load_source  # noqa: E402
from megatron_ext.elastic.slicing import build_slice, slice_model  # noqa: E402
from megatron_ext.elastic.standalone import budget_stages, distill, share_tokens  # noqa: E402
from megatron_ext.elastic.train_config import ElasticTrainConfig  # noqa: E402
from megatron_ext.models.builder import build_model  # noqa: E402
from megatron_ext.models.config import load_model_config  # noqa: E402
from megatron_ext.parallel import ParallelConfig, init_distributed  # noqa: E402
from megatron_ext.report import format_table  # noqa: E402
from megatron_ext.run_format import SUMMARY, checkpoints_dir, read_config, read_summary  # noqa: E402
from megatron_ext.training.data import build_batches  # noqa: E402
from megatron_ext.training.loop import evaluate  # noqa: E402

HERE = Path(__file__).resolve().parent


def main() -> None:
    run = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/demo/elastic")
    if not (run / SUMMARY).exists():
        sys.exit(f"{run} is not a finished train-elastic run (no summary.json)")
    cfg = read_config(run)
    elastic = section(cfg, "elastic", ElasticConfig)
    data = section(cfg, "data", DataConfig)
    seed = section(cfg, "run", RunConfig).seed
    train = section(cfg, "elastic_train", ElasticTrainConfig)
    curriculum = section(cfg, "curriculum", CurriculumConfig)
    dp = section(cfg, "parallel", ParallelConfig).dp
    summary = read_summary(run)
    index = len(elastic.budgets) - 1
    budget = elastic.budgets[index].name
    widths = load_choices(run)[budget]  # type: ignore[index]
    apply_engine_shims()
    pgs = init_distributed(ParallelConfig(), seed=seed)

    stages = budget_stages(curriculum, train, dp, len(elastic.budgets), index, seed)
    steps, tokens = sum(s.steps for s in stages), share_tokens(stages)

    eval_tc = TrainConfig(
        steps=1,
        warmup_steps=0,
        micro_batch_size=train.micro_batch_size,
        seq_length=train.eval_seq_length,
        eval_batches=train.eval_batches,
    )
    valid = build_batches(data, eval_tc, pgs, seed=seed)[1]

    source = Path(str(cfg.source.dir))
    teacher, stripes, model_cfg = load_source(source, pgs, cfg.model_backend)
    teacher.requires_grad_(False)
    parent_loss = evaluate(teacher, valid, pgs)
    small_cfg, state = slice_model(teacher, widths, ElasticController(model_cfg, stripes))
    student = build_slice(small_cfg, state, pg_collection=pgs)
    zero_shot = evaluate(student, valid, pgs)
    t0 = time.perf_counter()
    done = distill(student, teacher, stages, data, train, pgs)
    seconds = time.perf_counter() - t0
    separate = evaluate(student, valid, pgs)

    elastic_cfg = load_model_config(run)
    model = build_model(elastic_cfg, ParallelConfig(), pgs, backend=cfg.model_backend)
    ckpts = CheckpointManager(checkpoints_dir(run), pgs)
    ckpts.load(ckpts.latest_valid(), model, weights_only=True)
    ctrl = ElasticController(elastic_cfg, StripeLayout.load(checkpoints_dir(run)), mode="masked")
    convert_to_elastic(model, ctrl)
    elastic_loss = evaluate_at(model, ctrl, widths, valid, pgs)
    elastic_summary = summary["budgets"][budget]["val_loss"]

    out = {
        "run": str(run),
        "source": str(source),
        "budget": budget,
        "widths": widths,
        "steps": done,
        "elastic_steps": summary["steps"],
        "tokens": tokens,
        "elastic_tokens": summary["tokens"],
        "stages": [s.as_dict() for s in stages],
        "parent": parent_loss,
        "zero_shot": zero_shot,
        "zero_shot_summary": summary["budgets"][budget].get("zero_shot_val_loss"),
        "separate": separate,
        "elastic": elastic_loss,
        "elastic_summary": elastic_summary,
        "difference": separate - elastic_loss,
        "separate_train_s": seconds,
    }
    assert done == steps
    (HERE / "separate_vs_elastic.json").write_text(json.dumps(out, indent=2) + "\n")
    split = " + ".join(f"{s.steps}/{len(s.chosen)} @ seq {s.seq_length}" for s in stages)
    print(
        f"budget {budget} of {run}: {steps} of {summary['steps']} steps ({split}), "
        f"{tokens} of {summary['tokens']} tokens; parent held-out loss {parent_loss:.4f}"
    )
    rows = [
        ["zero-shot slice", 0, 0, zero_shot],
        ["separate: slice + KD", steps, tokens, separate],
        ["elastic (checkpoint)", steps, tokens, elastic_loss],
        ["elastic (summary.json)", steps, tokens, elastic_summary],
    ]
    print(format_table(["model", "steps", "tokens", "held-out loss"], rows))
    winner = "elastic" if elastic_loss < separate else "separate"
    print(f"separate - elastic = {separate - elastic_loss:+.4f} ({winner} is better)")


if __name__ == "__main__":
    main()
