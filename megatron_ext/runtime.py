"""Run-directory set-up and rank-0 output shared by the recipes."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from megatron_ext.run_format import save_config


def is_main() -> bool:
    """Whether this is global rank 0 (or a single process)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def main_print(*args: object) -> None:
    """``print`` on global rank 0 only."""
    if is_main():
        print(*args, flush=True)


def prepare_run_dir(cfg: DictConfig, run_dir: str) -> Path:
    """Create ``run_dir`` and save the resolved config there as ``config.yaml`` (rank 0)."""
    path = Path(run_dir)
    if is_main():
        path.mkdir(parents=True, exist_ok=True)
        save_config(path, cfg)
    if dist.is_initialized():
        dist.barrier()
    return path


def set_threads(threads: int) -> None:
    """Set torch's intra-op threads when ``threads > 0`` (0 keeps torch's default)."""
    if threads > 0:
        torch.set_num_threads(threads)
