"""Experiment tracking: wandb (offline by default) on global rank 0, or nothing."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch.distributed as dist

from megatron_ext.config.schema import LoggerConfig


class Tracker:
    """Logs metrics to wandb when configured, on rank 0 only; a no-op otherwise."""

    def __init__(self, cfg: LoggerConfig, run_dir: str | Path, name: str, config: dict[str, Any]):
        self._run = None
        rank = dist.get_rank() if dist.is_initialized() else 0
        if cfg.kind != "wandb" or rank != 0:
            return
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(
            project=cfg.project,
            name=name,
            dir=str(run_dir),
            mode=cfg.mode,  # type: ignore[arg-type]  # validated by LoggerConfig
            config=config,
            reinit=True,
        )

    @property
    def run_dir(self) -> str | None:
        """The wandb run's local directory, if a run is open."""
        return None if self._run is None else str(self._run.dir)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Log ``metrics`` at ``step``."""
        if self._run is not None:
            self._run.log(metrics, step=step)

    def finish(self) -> None:
        """Close the run (flushes the offline files)."""
        if self._run is not None:
            self._run.finish()
            self._run = None
