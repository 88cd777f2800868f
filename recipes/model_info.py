"""``star-elastic model-info``: build the model on the meta device and count its parameters."""

from __future__ import annotations

from omegaconf import DictConfig

from megatron_ext.config.compose import section
from megatron_ext.models.builder import build_model
from megatron_ext.models.config import HybridModelConfig
from megatron_ext.models.params import count_parameters
from megatron_ext.parallel import ParallelConfig, destroy_distributed, init_distributed, set_seed
from megatron_ext.report import key_value_table, write_summary
from megatron_ext.runtime import is_main, main_print, prepare_run_dir


def run(cfg: DictConfig) -> dict:
    """Count total and active parameters; write ``summary.json``; print a table."""
    model_cfg = section(cfg, "model", HybridModelConfig)
    parallel = section(cfg, "parallel", ParallelConfig)
    pgs = init_distributed(parallel)
    run_dir = prepare_run_dir(cfg, cfg.run.dir)
    set_seed(int(cfg.run.seed))
    model = build_model(model_cfg, parallel, pgs, backend=cfg.model_backend, meta=True)
    counts = count_parameters(model, model_cfg, pgs)
    summary = {
        "model": model_cfg.name,
        "layers": model_cfg.num_layers,
        "pattern": model_cfg.pattern,
        **counts.as_dict(),
    }
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
    destroy_distributed()
    return summary
