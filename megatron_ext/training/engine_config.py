"""The settings of the training engine, shared by every recipe's training config.

``train`` (train-parent), ``elastic_train`` (train-elastic) and ``qad_train`` (qad) carry the
same engine fields; :func:`check_engine_fields` validates them under the recipe's prefix and
:meth:`EngineConfig.of` collects them for :class:`~megatron_ext.training.engine.Engine`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron_ext.models.config import ConfigError, require

PRECISIONS = ("fp32", "bf16")
"""``fp32``: everything in fp32. ``bf16``: bf16 weights and compute, fp32 main parameters,
gradients and optimizer state (megatron-core's mixed precision)."""

RECOMPUTE = ("none", "selective", "full")
"""Activation recomputation: none; ``selective`` (megatron's core-attention recompute); ``full``
(every layer's forward is recomputed in the backward pass)."""


def check_engine_fields(cfg: Any, prefix: str) -> None:
    """Validate the engine fields of a recipe config; errors name ``<prefix>.<field>``."""
    require(
        cfg.precision in PRECISIONS,
        f"{prefix}.precision",
        f"{cfg.precision!r} is not one of {PRECISIONS}",
    )
    require(
        cfg.recompute in RECOMPUTE,
        f"{prefix}.recompute",
        f"{cfg.recompute!r} is not one of {RECOMPUTE}",
    )
    require(cfg.micro_batch_size >= 1, f"{prefix}.micro_batch_size", "must be >= 1")
    require(
        cfg.global_batch_size >= 0,
        f"{prefix}.global_batch_size",
        "must be >= 0 (0 = micro_batch_size x data-parallel size, no accumulation)",
    )
    if cfg.global_batch_size:
        require(
            cfg.global_batch_size % cfg.micro_batch_size == 0,
            f"{prefix}.global_batch_size",
            f"{cfg.global_batch_size} is not a multiple of {prefix}.micro_batch_size="
            f"{cfg.micro_batch_size}",
        )


def microbatches_per_step(global_batch: int, micro_batch: int, dp: int, field: str) -> int:
    """Micro-batches each data-parallel rank accumulates per step (``global_batch`` 0: one).

    Raises :class:`ConfigError` naming ``field`` when the global batch does not split evenly.
    """
    if global_batch == 0:
        return 1
    if global_batch % (micro_batch * dp):
        raise ConfigError(
            f"{field}: {global_batch} is not divisible by micro_batch_size x data-parallel size "
            f"= {micro_batch} x {dp}; choose a multiple of {micro_batch * dp}"
        )
    return global_batch // (micro_batch * dp)


@dataclass
class EngineConfig:
    """What :class:`~megatron_ext.training.engine.Engine` needs, gathered from a recipe config."""

    micro_batch_size: int = 8
    global_batch_size: int = 0
    precision: str = "fp32"
    recompute: str = "none"
    distributed_optimizer: bool = True
    overlap_grad_reduce: bool = False
    bucket_size: int = 0  # elements per DDP bucket; 0 = megatron-core's default
    lr: float = 1e-3
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    prefix: str = "train"

    def __post_init__(self) -> None:
        check_engine_fields(self, self.prefix)
        require(self.lr > 0, f"{self.prefix}.lr", "must be positive")
        require(self.grad_clip >= 0, f"{self.prefix}.grad_clip", "must be >= 0 (0 = no clip)")
        require(self.bucket_size >= 0, f"{self.prefix}.bucket_size", "must be >= 0")

    @classmethod
    def of(cls, cfg: Any, prefix: str, **overrides: Any) -> EngineConfig:
        """The engine settings of a recipe config ``cfg`` (fields it lacks keep defaults)."""
        values = {
            name: getattr(cfg, name)
            for name in cls.__dataclass_fields__
            if name != "prefix" and hasattr(cfg, name)
        }
        values.update(overrides)
        return cls(prefix=prefix, **values)

    def microbatches(self, dp: int) -> int:
        """Micro-batches per step and data-parallel rank at data-parallel size ``dp``."""
        return microbatches_per_step(
            self.global_batch_size, self.micro_batch_size, dp, f"{self.prefix}.global_batch_size"
        )


ENGINE_SECTIONS = ("train", "elastic_train", "qad_train")
"""The recipe config sections that carry engine fields."""


def check_batch_layout(cfg: Any) -> None:
    """Check every engine section's global batch against ``cfg.parallel``'s data-parallel size.

    ``cfg`` is a composed recipe config (a mapping with ``parallel`` and engine sections).
    Raises :class:`ConfigError` naming the field, before any process is started.
    """
    if "parallel" not in cfg:
        return
    par = cfg.parallel
    dp = int(par.nproc) // (int(par.tp) * int(par.get("pp", 1)))
    for name in ENGINE_SECTIONS:
        section = cfg.get(name)
        if section is not None and "global_batch_size" in section:
            microbatches_per_step(
                int(section.global_batch_size),
                int(section.micro_batch_size),
                max(1, dp),
                f"{name}.global_batch_size",
            )
