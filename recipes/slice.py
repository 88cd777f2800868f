"""``star-elastic slice``: standalone smaller checkpoints out of an elastic run, zero-shot."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from megatron_ext.config.compose import section
from megatron_ext.config.schema import DataConfig, RunConfig
from megatron_ext.elastic.budget_eval import load_choices
from megatron_ext.elastic.config import ElasticConfig
from megatron_ext.elastic.slice_run import (
    load_source,
    requested_widths,
    widths_source,
    write_slices,
)
from megatron_ext.export import ExportError
from megatron_ext.export.hf.elastic import elastic_budget_widths, is_elastic_hf, slice_elastic_hf
from megatron_ext.models.config import ConfigError
from megatron_ext.parallel import ParallelConfig, destroy_distributed, init_distributed, set_seed
from megatron_ext.report import format_table, write_summary
from megatron_ext.runtime import prepare_run_dir
from megatron_ext.training.data import held_out_batches
from megatron_ext.training.loop import evaluate


def _slice_elastic_hf(cfg: DictConfig, source_dir: Path, run_cfg: RunConfig, pgs) -> dict:
    """``slice`` of an elastic HF directory (``export budget=elastic format=hf``): each
    requested budget as a standalone HF model under ``<run.dir>/slices/<budget>``."""
    if OmegaConf.to_container(cfg.widths):
        raise ConfigError("widths: an elastic HF directory is sliced at its budgets' widths")
    try:
        names = list(elastic_budget_widths(source_dir, str(cfg.budget)))
    except ExportError as err:
        raise ConfigError(str(err)) from err
    run_dir = prepare_run_dir(cfg, run_cfg.dir)
    results = [slice_elastic_hf(source_dir, name, run_dir / "slices" / name, pgs) for name in names]
    summary = {
        "source": str(source_dir),
        "source_kind": "elastic hf",
        "budgets": {r.budget: r.as_dict() for r in results},
    }
    write_summary(run_dir, summary)
    rows = [[r.budget, r.extra.get("architecture"), r.files, r.bytes, str(r.path)] for r in results]
    print(f"standalone Hugging Face slices of {source_dir}")
    print(format_table(["budget", "architecture", "files", "bytes", "path"], rows))
    destroy_distributed()
    return summary


def run(cfg: DictConfig) -> dict:
    """Slice the requested budgets; write ``summary.json`` and print the per-budget table."""
    elastic = section(cfg, "elastic", ElasticConfig)
    run_cfg = section(cfg, "run", RunConfig)
    source_dir = Path(str(cfg.source.dir))
    pgs = init_distributed(ParallelConfig())  # slicing reads the unsharded (TP=1) weights
    if is_elastic_hf(source_dir):  # one elastic HF directory: standalone HF models out of it
        return _slice_elastic_hf(cfg, source_dir, run_cfg, pgs)
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
        valid = held_out_batches(
            data,
            pgs,
            seq_length=int(cfg.eval.seq_length),
            micro_batch_size=int(cfg.eval.micro_batch_size),
            count=int(cfg.eval.batches),
            seed=run_cfg.seed,
        )
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
