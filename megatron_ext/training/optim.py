"""Optimizer and learning-rate schedule.

A plain ``torch.optim.AdamW`` on each rank's shard: megatron-core's distributed optimizer
hard-codes CUDA buffers, and with explicit gradient reduction (:mod:`.grads`) the
per-shard AdamW update is exactly the unsharded one.
"""

from __future__ import annotations

import math

import torch

from megatron_ext.config.schema import TrainConfig


def _no_decay(name: str, param: torch.nn.Parameter) -> bool:
    return param.ndim < 2 or name.endswith(("A_log", "dt_bias", ".D"))


def build_optimizer(
    model: torch.nn.Module, cfg: TrainConfig, *, lr: float | None = None
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms, biases, SSM A/D/dt)."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if _no_decay(name, param) else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=lr or cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=1e-8
    )


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up for ``warmup_steps``, then cosine decay from ``lr`` to ``min_lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
