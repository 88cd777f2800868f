"""The optimisation settings of a training recipe (``train``)."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_ext.models.config import require
from megatron_ext.training.engine_config import check_engine_fields


@dataclass
class TrainConfig:
    """Optimisation settings of a training recipe."""

    steps: int = 600
    micro_batch_size: int = 8
    # Samples per optimizer step over all data-parallel ranks; micro-batches are accumulated
    # in between. 0 = micro_batch_size x DP (no accumulation).
    global_batch_size: int = 0
    # fp32, or bf16 with fp32 main parameters, gradients and optimizer state.
    precision: str = "fp32"
    recompute: str = "none"  # none | selective (core attention) | full (every layer)
    distributed_optimizer: bool = True  # ZeRO-1: optimizer state sharded over DP
    overlap_grad_reduce: bool = False  # bucketed gradient reduction during the backward
    seq_length: int = 128
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 30
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    grad_clip: float = 1.0
    eval_interval: int = 100
    eval_batches: int = 8
    save_interval: int = 200
    log_interval: int = 10
    threads: int = 0
    # Stop after this step and checkpoint (0 = run to ``steps``). The schedule still spans
    # ``steps``, so a run split into jobs is the same run.
    stop_at: int = 0
    # Fine-tuning: a train-parent run directory (or a checkpoint directory) whose newest weights
    # start this run, with a fresh optimizer and schedule; "" = random initialisation. Ignored
    # when the run resumes from a checkpoint of its own.
    init_from: str = ""

    def __post_init__(self) -> None:
        for field in ("steps", "micro_batch_size", "seq_length", "eval_batches"):
            require(getattr(self, field) > 0, f"train.{field}", "must be positive")
        for field in ("eval_interval", "save_interval", "log_interval"):
            require(getattr(self, field) > 0, f"train.{field}", "must be positive")
        require(self.lr > 0, "train.lr", "must be positive")
        require(0 <= self.min_lr <= self.lr, "train.min_lr", "must be in [0, train.lr]")
        require(
            0 <= self.warmup_steps < self.steps,
            "train.warmup_steps",
            f"must be in [0, train.steps={self.steps})",
        )
        require(self.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 disables clipping)")
        require(self.threads >= 0, "train.threads", "must be >= 0 (0 = torch default)")
        check_engine_fields(self, "train")
        require(
            0 <= self.stop_at <= self.steps,
            "train.stop_at",
            f"must be in [0, train.steps={self.steps}] (0 = no early stop)",
        )
