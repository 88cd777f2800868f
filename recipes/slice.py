"""``star-elastic slice``: standalone smaller checkpoints out of an elastic run, zero-shot."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from megatron_ext.config.compose import section
from megatron_ext.config.schema import DataConfig, RunConfig, TrainConfig
from megatron_ext.elastic.budget_eval import load_choices
from megatron_ext.elastic.config import ElasticConfig
from megatron_ext.elastic.slice_run import (
    load_source,
    requested_widths,
    widths_source,
    write_slices,
)
from megatron_ext.parallel import ParallelConfig, destroy_distributed, init_distributed, set_seed
from megatron_ext.report import format_table, write_summary
from megatron_ext.runtime import prepare_run_dir
from megatron_ext.training.data import build_batches
from megatron_ext.training.loop import evaluate


def run(cfg: DictConfig) -> dict:
    """Slice the requested budgets; write ``summary.json`` and print the per-budget table."""
    elastic = section(cfg, "elastic", ElasticConfig)
    run_cfg = section(cfg, "run", RunConfig)
    source_dir = Path(str(cfg.source.dir))
    pgs = init_distributed(ParallelConfig())  # slicing reads the unsharded (TP=1) weights
    run_dir = prepare_run_dir(cfg, run_cfg.dir)
    set_seed(run_cfg.seed)
    model, stripes, model_cfg = load_source(source_dir, pgs, cfg.model_backend)
    elastic.validate_for(model_cfg, ParallelConfig())
    explicit = OmegaConf.to_container(cfg.widths) or {}
    chosen = load_choices(source_dir)  # the router's choices, when source.dir is an elastic run
    budgets = requested_widths(elastic, model_cfg, str(cfg.budget), explicit, chosen)  # type: ignore[arg-type]
    valid = None
    if cfg.eval.enabled:
        data = section(cfg, "data", DataConfig)
        ev = TrainConfig(
            steps=1,
            warmup_steps=0,
            micro_batch_size=int(cfg.eval.micro_batch_size),
            seq_length=int(cfg.eval.seq_length),
            eval_batches=int(cfg.eval.batches),
        )
        valid = build_batches(data, ev, pgs, seed=run_cfg.seed)[1]
    results = write_slices(model, model_cfg, stripes, budgets, run_dir / "slices", pgs, valid)
    full_loss = evaluate(model, valid, pgs) if valid else None
    summary = {
        "source": str(source_dir),
        "stripe": {"tp": stripes.tp, "ep": stripes.ep},
        "full_val_loss": full_loss,
        "budgets": {
            r.name: {**r.as_dict(), "widths_from": widths_source(r.name, chosen)} for r in results
        },
    }
    write_summary(run_dir, summary)
    rows = [
        [
            r.name,
            r.params_total,
            r.params_active,
            r.val_loss if r.val_loss is not None else "-",
            r.bytes,
            r.write_s / r.copy_s if r.copy_s else "-",
        ]
        for r in results
    ]
    print(f"slices of {source_dir} (full model held-out loss: {full_loss})")
    print(
        format_table(
            ["budget", "params", "active params", "held-out loss", "bytes", "write/copy"], rows
        )
    )
    destroy_distributed()
    return summary
