"""Settings of elastic training that are not the curriculum, the router or the budgets."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_ext.models.config import require
from megatron_ext.training.engine_config import check_engine_fields


@dataclass
class ElasticTrainConfig:
    """Loss weights, optimisation and evaluation of ``train-elastic``.

    The loss is ``KD(teacher ‖ student) + cost_weight · |cost − target| / target``, plus
    ``ce_weight`` times the next-token cross-entropy (the trainable-teacher variant).
    """

    micro_batch_size: int = 8
    # Sequences per step over all DP ranks (0 = micro_batch_size x DP); a curriculum stage's
    # own global_batch_size overrides it. Micro-batches in between accumulate gradients.
    global_batch_size: int = 0
    precision: str = "fp32"  # or bf16 (fp32 main parameters, gradients, optimizer state)
    recompute: str = "none"  # or selective (core attention)
    distributed_optimizer: bool = True
    overlap_grad_reduce: bool = False
    kd_temperature: float = 1.0
    cost_weight: float = 1.0
    # "abs": |cost - target| / target (the paper's); "squared": its square, which keeps a
    # shrinking gradient near the target instead of jumping across it before the router freezes.
    cost_loss: str = "abs"
    # Scale of the task (KD) loss's share of the router gradient; 1.0 is the paper's joint
    # training. The soft-mask estimator sees no gain from channels a narrow choice cuts off
    # behind the residual norms, so on small runs that share can pull the router off budget.
    router_task_weight: float = 1.0
    ce_weight: float = 0.0
    # positions of the (local) sequence whose logits the distillation computes at once
    # (megatron_ext.distill_chunked); 0 = the whole sequence's logits at once
    kd_chunk_size: int = 1024
    warmup_steps: int = 20
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    grad_clip: float = 1.0
    eval_interval: int = 50
    eval_batches: int = 8
    eval_seq_length: int = 128
    save_interval: int = 100
    log_interval: int = 10
    stop_at: int = 0

    def __post_init__(self) -> None:
        for field in ("micro_batch_size", "eval_interval", "eval_batches", "eval_seq_length"):
            require(getattr(self, field) > 0, f"elastic_train.{field}", "must be positive")
        for field in ("save_interval", "log_interval"):
            require(getattr(self, field) > 0, f"elastic_train.{field}", "must be positive")
        require(
            self.cost_loss in ("abs", "squared"),
            "elastic_train.cost_loss",
            "must be abs or squared",
        )
        require(self.kd_temperature > 0, "elastic_train.kd_temperature", "must be positive")
        for field in (
            "cost_weight",
            "ce_weight",
            "weight_decay",
            "grad_clip",
            "warmup_steps",
            "router_task_weight",
        ):
            require(getattr(self, field) >= 0, f"elastic_train.{field}", "must be >= 0")
        require(self.kd_chunk_size >= 0, "elastic_train.kd_chunk_size", "must be >= 0 (0 = whole)")
        require(self.stop_at >= 0, "elastic_train.stop_at", "must be >= 0 (0 = no early stop)")
        check_engine_fields(self, "elastic_train")
        require(
            self.recompute != "full",
            "elastic_train.recompute",
            "full recompute would run the router's gates through a nested backward; use "
            "none or selective",
        )
