"""``star-elastic model-info``: build the model on the meta device and count its parameters;
with ``elastic=<config>``, also every budget's slice (its widths' smaller config, on meta)."""

from __future__ import annotations

from omegaconf import DictConfig

from megatron_ext.config.compose import section
from megatron_ext.elastic.config import ElasticConfig
from megatron_ext.elastic.slicing import sliced_config
from megatron_ext.models.builder import build_model
from megatron_ext.models.config import HybridModelConfig
from megatron_ext.models.params import count_parameters
from megatron_ext.parallel import ParallelConfig, destroy_distributed, init_distributed, set_seed
from megatron_ext.report import format_table, key_value_table, write_summary
from megatron_ext.runtime import is_main, main_print, prepare_run_dir


def budget_counts(
    model_cfg: HybridModelConfig, elastic: ElasticConfig, parallel: ParallelConfig, pgs, backend
) -> dict[str, dict]:
    """Per budget: its widths and the total / active parameters of its meta-device slice."""
    full = count_parameters(
        build_model(model_cfg, parallel, pgs, backend=backend, meta=True), model_cfg, pgs
    )
    out = {}
    for budget in elastic.budgets:
        widths = elastic.widths_for(budget.name, model_cfg)
        small = sliced_config(model_cfg, widths)
        counts = count_parameters(
            build_model(small, parallel, pgs, backend=backend, meta=True), small, pgs
        )
        out[budget.name] = {
            "widths": widths,
            "target": budget.target,
            "kind": budget.kind,
            "params_total": counts.total,
            "params_active": counts.active,
            "total_fraction": counts.total / full.total,
            "active_fraction": counts.active / full.active,
        }
    return out


def run(cfg: DictConfig) -> dict:
    """Count total and active parameters (per budget too); write ``summary.json``; print."""
    model_cfg = section(cfg, "model", HybridModelConfig)
    parallel = section(cfg, "parallel", ParallelConfig)
    elastic = section(cfg, "elastic", ElasticConfig) if cfg.get("elastic") else None
    if elastic is not None:
        elastic.validate_for(model_cfg, parallel)  # before any work
    pgs = init_distributed(parallel)
    run_dir = prepare_run_dir(cfg, cfg.run.dir)
    set_seed(int(cfg.run.seed))
    model = build_model(model_cfg, parallel, pgs, backend=cfg.model_backend, meta=True)
    counts = count_parameters(model, model_cfg, pgs)
    summary: dict = {
        "model": model_cfg.name,
        "layers": model_cfg.num_layers,
        "pattern": model_cfg.pattern,
        **counts.as_dict(),
    }
    if elastic is not None:
        summary["budgets"] = budget_counts(model_cfg, elastic, parallel, pgs, cfg.model_backend)
    if is_main():
        write_summary(run_dir, summary)
    main_print(
        key_value_table(
            f"model {model_cfg.name}",
            {
                "layers (M/*/-/E)": "/".join(str(model_cfg.count(s)) for s in "M*-E"),
                "params_total": counts.total,
                "params_active": counts.active,
                "params_total (B)": round(counts.total / 1e9, 3),
                "params_active (B)": round(counts.active / 1e9, 3),
            },
        )
    )
    if elastic is not None:
        axes = list(elastic.axes)
        rows = [
            [
                name,
                f"{b['params_total'] / 1e9:.2f}B",
                f"{b['params_active'] / 1e9:.2f}B",
                f"{b['total_fraction']:.3f}",
                b["target"],
                *(b["widths"][a] for a in axes),
            ]
            for name, b in summary["budgets"].items()
        ]
        header = ["budget", "total", "active", "total / parent", "target", *axes]
        main_print(format_table(header, rows))
    destroy_distributed()
    return summary
