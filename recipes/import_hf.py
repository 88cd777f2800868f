"""``star-elastic import-hf``: a Hugging Face checkpoint as a parent run of this project."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from megatron_ext.checkpoint import CheckpointManager
from megatron_ext.config.compose import section, to_plain
from megatron_ext.config.schema import DataConfig, RunConfig
from megatron_ext.export import ExportError
from megatron_ext.export.hf.import_run import ImportHFConfig, check_importable, import_hf
from megatron_ext.models.config import ConfigError
from megatron_ext.parallel import ParallelConfig, destroy_distributed, init_distributed, set_seed
from megatron_ext.report import key_value_table, write_summary
from megatron_ext.run_format import TOKENIZER, checkpoints_dir
from megatron_ext.runtime import is_main, main_print, prepare_run_dir


def run(cfg: DictConfig) -> dict:
    """Import ``hf.dir`` into ``run.dir``; write ``config.yaml``, ``summary.json``, a table."""
    hf_cfg = section(cfg, "hf", ImportHFConfig)
    run_cfg = section(cfg, "run", RunConfig)
    try:
        check_importable(hf_cfg.dir)  # the model_type and the config, before any work
    except ExportError as err:
        raise ConfigError(f"hf.dir: {err}") from err
    run_dir = Path(run_cfg.dir)
    if CheckpointManager(checkpoints_dir(run_dir), None).latest_valid() is not None:
        raise ConfigError(f"run.dir: {run_dir} already holds a checkpoint; choose a new run.dir")
    pgs = init_distributed(ParallelConfig())  # the checkpoint is written unsharded (TP=1)
    set_seed(run_cfg.seed)
    result = import_hf(hf_cfg.dir, run_dir, pgs, backend=str(cfg.model_backend))
    data = DataConfig(tokenizer="hf", tokenizer_path=str(run_dir.resolve() / TOKENIZER))
    saved = to_plain(cfg)
    saved["model"] = dataclasses.asdict(result.model)
    if result.tokenizer is not None:
        saved["data"] = dataclasses.asdict(data)
    prepare_run_dir(OmegaConf.create(saved), str(run_dir))
    summary = {"source": str(Path(hf_cfg.dir).resolve()), **result.as_dict()}
    if is_main():
        write_summary(run_dir, summary)
    main_print(
        key_value_table(
            f"imported {hf_cfg.dir} -> {run_dir}",
            {
                "family / architecture": f"{result.family} / {result.architecture}",
                "pattern": result.model.pattern,
                "params (total / active)": f"{result.params_total:,} / {result.params_active:,}",
                "checkpoint": str(result.checkpoint),
                "tokenizer": str(result.tokenizer) if result.tokenizer else "none",
                "next": f"star-elastic importance parent.dir={run_dir} (its tokenizer comes along)",
            },
        )
    )
    destroy_distributed()
    return summary
