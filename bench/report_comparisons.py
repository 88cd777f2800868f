"""The report's model comparisons on one finished train-elastic run, all in one process.

Usage: python bench/report_comparisons.py ELASTIC_RUN OUT_DIR [PROMPTS] [DEPTH]

Writes OUT_DIR/summary.json (read by ``star-elastic report``) and prints tables:

* nested vs standalone, every budget: the zero-shot slice of the importance-ordered parent
  at the budget's final router widths, that slice distilled alone from the frozen parent
  with the budget's share of the elastic run (same tokens, loss, optimizer:
  :mod:`megatron_ext.elastic.standalone`), and the elastic checkpoint at the same widths;
* width vs depth at equal parameters: a depth-only budget (every width full, the ``DEPTH``
  top-ranked layers, default the largest reduced depth of ``elastic.axes.depth``) and the
  width-only budget nearest its parameter count (±2%,
  :func:`megatron_ext.elastic.equal_params.equal_params_budgets`), both sliced from the parent
  and distilled alone with the smallest budget's share of the run;
* every model's held-out loss on the run's held-out split and on a second corpus no run
  trained on (Debian's licence texts, :mod:`megatron_ext.data.system_corpus`), each as the
  mean over batches with its standard error, and its task accuracy (think and answer at
  its own size) on the first PROMPTS (default 64) test prompts, with the binomial standard
  error.
"""

from __future__ import annotations

from megatron_ext.compat import ensure_compat

ensure_compat()  # the entry point's shims, before megatron-core's model modules are imported

import math
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from megatron_ext.checkpoint import CheckpointManager  # noqa: E402
from megatron_ext.compat.engine import apply_engine_shims  # noqa: E402
from megatron_ext.config.compose import section  # noqa: E402
from megatron_ext.config.schema import DataConfig, RunConfig, TrainConfig  # noqa: E402
from megatron_ext.data.cache import tokenizer_for  # noqa: E402
from megatron_ext.data.system_corpus import corpus_batches, read_system_corpus  # noqa: E402
from megatron_ext.elastic.budget_eval import load_choices  # noqa: E402
from megatron_ext.elastic.config import DEPTH, ElasticConfig  # noqa: E402
from megatron_ext.elastic.controller import ElasticController, StripeLayout  # noqa: E402
from megatron_ext.elastic.convert import convert_to_elastic  # noqa: E402
from megatron_ext.elastic.curriculum import CurriculumConfig  # noqa: E402
from megatron_ext.elastic.equal_params import equal_params_budgets  # noqa: E402
from megatron_ext.elastic.slice_run import load_source  # noqa: E402
from megatron_ext.elastic.slicing import build_slice, slice_model  # noqa: E402
from megatron_ext.elastic.standalone import budget_stages, distill, share_tokens  # noqa: E402
from megatron_ext.elastic.train_config import ElasticTrainConfig  # noqa: E402
from megatron_ext.generate.config import GenerateConfig  # noqa: E402
from megatron_ext.generate.evaluate import (  # noqa: E402
    evaluation_set,
    first_prompts,
    own_budget_accuracy,
)
from megatron_ext.generate.sources import SliceBudgets  # noqa: E402
from megatron_ext.models.builder import build_model  # noqa: E402
from megatron_ext.models.config import load_model_config  # noqa: E402
from megatron_ext.parallel import ParallelConfig, init_distributed  # noqa: E402
from megatron_ext.report import format_table  # noqa: E402
from megatron_ext.run_format import (  # noqa: E402
    SUMMARY,
    checkpoints_dir,
    read_config,
    read_summary,
    write_json,
)
from megatron_ext.training.data import build_batches  # noqa: E402
from megatron_ext.training.loop import lm_loss  # noqa: E402

HERE = Path(__file__).resolve().parent
GENERATION = HERE.parent / "conf" / "generation" / "arithmetic.yaml"
SECOND_CORPUS_BATCHES = 32


def typed(cfg, name: str, kind):
    """Group ``name`` of a run's saved ``config.yaml`` as a validated ``kind`` (the saved
    file is plain YAML: merged onto the structured schema so nested configs are typed)."""
    merged = OmegaConf.merge(OmegaConf.structured(kind), cfg[name])
    return section(OmegaConf.create({name: merged}), name, kind)


def losses(model, batches) -> dict[str, float]:
    """Mean held-out loss over ``batches`` and its standard error (over batches)."""
    model.eval()
    with torch.no_grad():
        values = [float(lm_loss(model, b)) for b in batches]
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)
    return {"loss": mean, "sem": math.sqrt(var / len(values)), "batches": len(values)}


def task_accuracy(model, tokenizer, gen: GenerateConfig, evalset) -> dict[str, float]:
    """Exact-match accuracy of ``model`` thinking and answering alone, with its standard error."""
    figures = own_budget_accuracy(SliceBudgets({"X": model}), tokenizer, gen, evalset, ["X"])["X"]
    model.train()
    return {
        "accuracy": figures["accuracy"],
        "correct": figures["correct"],
        "total": figures["total"],
    }


def generation_config(prompts: int) -> GenerateConfig:
    """conf/generation/arithmetic.yaml, thinking and answering at one model."""
    raw = OmegaConf.to_container(OmegaConf.load(GENERATION))
    assert isinstance(raw, dict)
    raw.pop("defaults", None)
    raw.update(think_budget="X", answer_budget="X", all_pairs=False, warmup=False)
    gen = GenerateConfig(**raw)
    gen.prompts = []
    return gen


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    run, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    n_prompts = int(sys.argv[3]) if len(sys.argv) > 3 else 64
    if not (run / SUMMARY).exists():
        sys.exit(f"{run} is not a finished train-elastic run (no summary.json)")
    corpus = read_system_corpus()  # refuses before any work when the folder is absent
    cfg = read_config(run)
    elastic = typed(cfg, "elastic", ElasticConfig)
    data = typed(cfg, "data", DataConfig)
    seed = section(cfg, "run", RunConfig).seed
    train = typed(cfg, "elastic_train", ElasticTrainConfig)
    curriculum = typed(cfg, "curriculum", CurriculumConfig)
    dp = section(cfg, "parallel", ParallelConfig).dp
    summary = read_summary(run)
    choices = load_choices(run) or {}
    apply_engine_shims()
    pgs = init_distributed(ParallelConfig(), seed=seed)
    tokenizer = tokenizer_for(data)

    eval_tc = TrainConfig(
        steps=1,
        warmup_steps=0,
        micro_batch_size=train.micro_batch_size,
        seq_length=train.eval_seq_length,
        eval_batches=train.eval_batches,
    )
    valid = build_batches(data, eval_tc, pgs, seed=seed)[1]
    docs = [tokenizer.encode(t, parse_special=False) for t in corpus.texts]
    second = corpus_batches(
        docs, tokenizer.eod, train.eval_seq_length, train.micro_batch_size, SECOND_CORPUS_BATCHES
    )
    gen = generation_config(n_prompts)
    evalset = first_prompts(evaluation_set(gen, data), n_prompts)

    def measure(model) -> dict:
        return {
            "held_out": losses(model, valid),
            "second_corpus": losses(model, second),
            "task": task_accuracy(model, tokenizer, gen, evalset),
            "params": sum(p.numel() for p in model.parameters()),
        }

    source = Path(str(cfg.source.dir))
    teacher, stripes, model_cfg = load_source(source, pgs, cfg.model_backend)
    teacher.requires_grad_(False)
    source_ctrl = ElasticController(model_cfg, stripes)
    results: dict = {"parent": measure(teacher), "budgets": {}}

    elastic_cfg = load_model_config(run)
    model = build_model(elastic_cfg, ParallelConfig(), pgs, backend=cfg.model_backend)
    ckpts = CheckpointManager(checkpoints_dir(run), pgs)
    ckpts.load(ckpts.latest_valid(), model, weights_only=True)
    ctrl = ElasticController(elastic_cfg, StripeLayout.load(checkpoints_dir(run)), mode="masked")
    convert_to_elastic(model, ctrl)
    model.requires_grad_(False)

    def standalone(widths, stages) -> tuple[dict, dict, float]:
        small_cfg, state = slice_model(teacher, widths, source_ctrl)
        student = build_slice(small_cfg, state, pg_collection=pgs)
        zero_shot = measure(student)
        t0 = time.perf_counter()
        steps = distill(student, teacher, stages, data, train, pgs)
        seconds = time.perf_counter() - t0
        assert steps == sum(s.steps for s in stages)
        return zero_shot, measure(student), seconds

    n = len(elastic.budgets)
    for index, budget in enumerate(elastic.budgets):
        widths = choices.get(budget.name) or elastic.widths_for(budget.name, model_cfg)
        stages = budget_stages(curriculum, train, dp, n, index, seed)
        zero_shot, alone, seconds = standalone(widths, stages)
        cfg_at, state_at = slice_model(model, dict(widths))
        nested = measure(build_slice(cfg_at, state_at, pg_collection=pgs))
        results["budgets"][budget.name] = {
            "widths": widths,
            "steps": sum(s.steps for s in stages),
            "tokens": share_tokens(stages),
            "stages": [s.as_dict() for s in stages],
            "zero_shot": zero_shot,
            "standalone": alone,
            "elastic": nested,
            "elastic_summary_val_loss": summary["budgets"][budget.name]["val_loss"],
            "standalone_train_s": seconds,
        }
        print(f"budget {budget.name}: {results['budgets'][budget.name]['steps']} steps done")

    depth_choices = sorted(d for d in elastic.axes.get(DEPTH, []) if d != model_cfg.num_layers)
    if depth_choices and stripes.layer_order:
        depth = int(sys.argv[4]) if len(sys.argv) > 4 else depth_choices[-1]
        pair = equal_params_budgets(elastic, model_cfg, stripes.layer_order, depth)
        stages = budget_stages(curriculum, train, dp, n, n - 1, seed)
        entry = {
            "depth": depth,
            "full_params": pair.full_params,
            "mismatch": pair.mismatch,
            "steps": sum(s.steps for s in stages),
            "tokens": share_tokens(stages),
        }
        for kind, widths, params in (
            ("width_only", pair.width_only, pair.width_params),
            ("depth_only", pair.depth_only, pair.depth_params),
        ):
            zero_shot, alone, _ = standalone(widths, stages)
            entry[kind] = {"widths": widths, "params": params, "zero_shot": zero_shot}
            entry[kind]["distilled"] = alone
        results["width_vs_depth"] = entry

    results.update(
        run=str(run),
        source=str(source),
        prompts=len(evalset.prompts),
        prompts_from=evalset.origin,
        second_corpus={"root": str(corpus.root), "files": corpus.names, "chars": corpus.chars},
        second_corpus_tokens=sum(int(b["loss_mask"].sum()) for b in second),
        elastic_steps=summary["steps"],
        elastic_tokens=summary["tokens"],
    )
    write_json(out_dir / SUMMARY, results, indent=2)
    rows = []
    for name, b in results["budgets"].items():
        for kind in ("zero_shot", "standalone", "elastic"):
            m = b[kind]
            rows.append(
                [name, kind, b["steps"] if kind != "zero_shot" else 0, m["held_out"]["loss"]]
                + [m["second_corpus"]["loss"], m["task"]["accuracy"]]
            )
    headers = ["budget", "model", "steps", "held-out loss", "licences loss", "accuracy"]
    print(format_table(headers, rows))
    print(f"wrote {out_dir / 'summary.json'}")


if __name__ == "__main__":
    main()
