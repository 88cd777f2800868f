"""``star-elastic export``: one budget's slice as a megatron, Hugging Face or NeMo checkpoint."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from megatron_ext.checkpoint import CheckpointError, CheckpointManager
from megatron_ext.config.compose import section
from megatron_ext.config.schema import DataConfig, RunConfig
from megatron_ext.data.cache import tokenizer_for
from megatron_ext.elastic.budget_eval import load_choices
from megatron_ext.elastic.config import ElasticConfig
from megatron_ext.elastic.controller import ElasticController
from megatron_ext.elastic.slice_run import load_source, requested_widths, widths_source
from megatron_ext.export import FORMATS, ExportError, export_slice
from megatron_ext.export.hf.elastic import ELASTIC_BUDGET, save_elastic_hf
from megatron_ext.export.storage import compare_storage
from megatron_ext.export.tokenizer import source_data_config
from megatron_ext.models.config import ConfigError
from megatron_ext.parallel import ParallelConfig, destroy_distributed, init_distributed, set_seed
from megatron_ext.report import format_table, write_summary
from megatron_ext.run_format import checkpoints_dir
from megatron_ext.runtime import main_print, prepare_run_dir


def _formats(value: str) -> list[str]:
    if value == "all":
        return list(FORMATS)
    if value not in FORMATS:
        raise ConfigError(f"format: {value!r} is not one of {FORMATS} or 'all'")
    return [value]


def _check_formats(formats: list[str], model_cfg) -> None:
    """Refuse up front what a format cannot write, before any slice is made."""
    try:
        if "hf" in formats:
            from megatron_ext.export.hf import check_hf_compatible

            check_hf_compatible(model_cfg)
        if "nemo" in formats:
            from megatron_ext.export.nemo import require_nemo

            require_nemo()
    except (ExportError, ImportError) as err:
        raise ConfigError(f"format: {err}") from err


def run(cfg: DictConfig) -> dict:
    """Export the requested budget(s) in the requested format(s); write ``summary.json``."""
    elastic = section(cfg, "elastic", ElasticConfig)
    run_cfg = section(cfg, "run", RunConfig)
    formats = _formats(str(cfg.format))
    whole = str(cfg.budget) == ELASTIC_BUDGET  # the whole elastic model as one HF directory
    if whole and formats != ["hf"]:
        raise ConfigError(f"budget: {ELASTIC_BUDGET!r} is written only with format=hf")
    source_dir = Path(str(cfg.source.dir))
    pgs = init_distributed(ParallelConfig())  # slicing reads the unsharded (TP=1) weights
    run_dir = prepare_run_dir(cfg, run_cfg.dir)
    set_seed(run_cfg.seed)
    model, stripes, model_cfg = load_source(source_dir, pgs, cfg.model_backend)
    elastic.validate_for(model_cfg, ParallelConfig())
    _check_formats(formats, model_cfg)
    chosen = load_choices(source_dir)  # the router's choices, when source.dir is an elastic run
    budgets = requested_widths(elastic, model_cfg, "all" if whole else str(cfg.budget), {}, chosen)
    controller = ElasticController(model_cfg, stripes=stripes, mode="masked")
    data, data_from = source_data_config(source_dir, section(cfg, "data", DataConfig))
    tokenizer = tokenizer_for(data)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ConfigError(
            f"{data_from}: the tokenizer has {tokenizer.vocab_size} ids, the model "
            f"{model_cfg.vocab_size} rows"
        )
    out_dir = Path(str(cfg.out_dir)) if cfg.out_dir else run_dir / "export"
    results = []
    if whole:
        result = save_elastic_hf(
            model,
            model_cfg,
            budgets,
            stripes,
            out_dir / "hf" / ELASTIC_BUDGET,
            widths_from={name: widths_source(name, chosen) for name in budgets},
            tokenizer=tokenizer,
            max_shard_bytes=int(cfg.hf.max_shard_bytes),
        )
        result.extra["widths"] = budgets
        result.extra["widths_from"] = "; ".join(
            f"{name}: {widths_source(name, chosen)}" for name in budgets
        )
        results.append(result)
        budgets = {}
    for name, widths in budgets.items():
        for fmt in formats:
            extra = {"max_shard_bytes": int(cfg.hf.max_shard_bytes)} if fmt == "hf" else {}
            result = export_slice(
                fmt,
                model,
                widths,
                out_dir / fmt / name,
                budget=name,
                controller=controller,
                tokenizer=tokenizer,
                pg_collection=pgs,
                **extra,
            )
            result.extra["widths"] = widths
            result.extra["widths_from"] = widths_source(name, chosen)
            results.append(result)
    summary: dict = {
        "source": str(source_dir),
        "stripe": {"tp": stripes.tp, "ep": stripes.ep},
        "tokenizer": {"kind": data.tokenizer, "from": data_from},
        "exports": [r.as_dict() for r in results],
    }
    if cfg.sizes.separate:
        latest = CheckpointManager(checkpoints_dir(source_dir), pgs).latest_valid()
        if latest is None:
            raise CheckpointError(f"source.dir: no valid checkpoint under {source_dir}")
        every = requested_widths(elastic, model_cfg, "all", {}, chosen)
        storage = compare_storage(latest, model, every, controller, pgs, workdir=run_dir)
        summary.update(storage.as_dict())
    write_summary(run_dir, summary)
    rows = [
        [r.format, r.budget, r.extra["widths_from"], r.files, r.bytes, str(r.path)] for r in results
    ]
    main_print(f"exports of {source_dir}")
    main_print(format_table(["format", "budget", "widths from", "files", "bytes", "path"], rows))
    if cfg.sizes.separate:
        main_print(
            f"storage: one elastic checkpoint {summary['elastic_bytes']:,} bytes vs separate "
            f"checkpoints for {sorted(summary['separate_slices'])} "
            f"{summary['separate_slices_bytes']:,} bytes "
            f"({summary['separate_over_elastic']:.2f}x)"
        )
    destroy_distributed()
    return summary
