"""The learning-rate schedule of train-parent (the optimizer is megatron-core's, built by
:class:`~megatron_ext.training.engine.Engine`)."""

from __future__ import annotations

import math

from megatron_ext.training.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up for ``warmup_steps``, then cosine decay from ``lr`` to ``min_lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))
