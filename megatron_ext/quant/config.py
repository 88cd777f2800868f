"""The quantization settings (Hydra group ``quant``) and QAD's (group ``qad_train``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from megatron_ext.models.config import require
from megatron_ext.quant.formats import FORMATS
from megatron_ext.training.engine_config import check_engine_fields

BACKENDS: tuple[str, ...] = ("auto", "fake", "scaled_mm", "te")
"""How quantized GEMMs run; see :func:`megatron_ext.quant.backends.resolve_backend`."""

CALIB_BUDGETS: tuple[str, ...] = ("all", "full")
MISALIGNED: tuple[str, ...] = ("high_precision", "error")
TEACHERS: tuple[str, ...] = ("elastic", "parent")


@dataclass
class QuantConfig:
    """How the elastic model is quantized.

    * ``format``: ``fp8`` (E4M3, per-tensor scales) or ``nvfp4`` (E2M1, an E4M3 scale per 16
      input channels, an FP32 per-tensor scale).
    * ``backend``: ``fake`` (fake-quant, any device), ``scaled_mm`` (FP8 GEMMs through
      ``torch._scaled_mm`` on Hopper or newer), ``te`` (Transformer Engine's FP8 recipe on
      its own layer spec), or ``auto`` (``scaled_mm`` where it can run, else ``fake``).
    * ``calib_batches``: training batches for the amax calibration of the inputs.
    * ``calib_budgets``: ``all`` takes each input's maximum over every budget's forward pass,
      ``full`` over the full model only. Either way one scale per tensor, shared by all
      budgets and inherited by every slice.
    * ``attention_high_precision``: the Nano v3 NVFP4 release policy. Attention layers, and
      the Mamba layer right before each of them (the one feeding it), stay unquantized (BF16
      there; the model's own dtype here).
    * ``skip``: ``fnmatch`` patterns of module names that stay unquantized (the LM head by
      default, as in ModelOpt's exports).
    * ``misaligned``: NVFP4 only. A GEMM whose active input channels, at some budget, do not
      fill whole 16-element blocks (e.g. Mamba ``out_proj`` at ``mamba_head_dim`` 8) cannot
      slice its block scales exactly: keep it unquantized (``high_precision``, listed in the
      report) or refuse (``error``).
    """

    format: str = "nvfp4"
    backend: str = "auto"
    calib_batches: int = 8
    calib_budgets: str = "all"
    attention_high_precision: bool = False
    skip: list[str] = field(default_factory=lambda: ["output_layer"])
    misaligned: str = "high_precision"

    def __post_init__(self) -> None:
        require(self.format in FORMATS, "quant.format", f"{self.format!r} is not one of {FORMATS}")
        require(
            self.backend in BACKENDS, "quant.backend", f"{self.backend!r} is not one of {BACKENDS}"
        )
        require(
            self.backend != "scaled_mm" or self.format == "fp8",
            "quant.backend",
            "scaled_mm runs FP8 GEMMs only; NVFP4 GEMMs need Blackwell and are emulated "
            "(use quant.backend=fake or auto)",
        )
        require(
            isinstance(self.calib_batches, int) and self.calib_batches >= 1,
            "quant.calib_batches",
            f"{self.calib_batches!r} must be an integer >= 1",
        )
        require(
            self.calib_budgets in CALIB_BUDGETS,
            "quant.calib_budgets",
            f"{self.calib_budgets!r} is not one of {CALIB_BUDGETS}",
        )
        require(
            self.misaligned in MISALIGNED,
            "quant.misaligned",
            f"{self.misaligned!r} is not one of {MISALIGNED}",
        )
        self.skip = list(self.skip)
        for pattern in self.skip:
            require(
                isinstance(pattern, str) and bool(pattern),
                "quant.skip",
                f"patterns must be non-empty strings, got {pattern!r}",
            )


@dataclass
class QADConfig:
    """QAD training and evaluation settings (Hydra group ``qad_train``).

    ``steps`` 0 stops after PTQ. ``budget_probs``: one probability per budget in the elastic
    config's order (largest first), empty for uniform. The learning rate warms up linearly
    over ``warmup_steps``, then decays by a cosine to ``lr * min_lr_ratio``.
    """

    steps: int = 120
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 5
    micro_batch_size: int = 8
    # Sequences per step (0 = micro_batch_size, no accumulation); see the train config.
    global_batch_size: int = 0
    precision: str = "fp32"
    recompute: str = "none"
    distributed_optimizer: bool = True
    overlap_grad_reduce: bool = False
    save_interval: int = 50  # checkpoint every this many QAD steps (and at the end)
    seq_length: int = 128
    budget_probs: list[float] = field(default_factory=list)
    kd_temperature: float = 1.0
    # positions whose logits the distillation computes at once (megatron_ext.distill_chunked);
    # 0 = the whole sequence
    kd_chunk_size: int = 1024
    grad_clip: float = 1.0
    teacher: str = "elastic"
    eval_batches: int = 8
    eval_seq_length: int = 128
    # exact-match task accuracy of every budget (think and answer at it), unquantized, after
    # PTQ and after QAD, on the first this-many prompts of the data's test split; 0 = none
    task_prompts: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "warmup_steps", "seed", "task_prompts"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 0, f"qad_train.{name}", "must be >= 0")
        for name in ("micro_batch_size", "seq_length", "eval_batches", "eval_seq_length"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, f"qad_train.{name}", "must be >= 1")
        require(self.lr > 0, "qad_train.lr", f"{self.lr!r} must be > 0")
        require(0 <= self.min_lr_ratio <= 1, "qad_train.min_lr_ratio", "must be in [0, 1]")
        require(self.kd_temperature > 0, "qad_train.kd_temperature", "must be > 0")
        require(self.kd_chunk_size >= 0, "qad_train.kd_chunk_size", "must be >= 0 (0 = whole)")
        require(self.grad_clip >= 0, "qad_train.grad_clip", "must be >= 0 (0 disables it)")
        require(self.save_interval >= 1, "qad_train.save_interval", "must be >= 1")
        check_engine_fields(self, "qad_train")
        require(
            self.teacher in TEACHERS,
            "qad_train.teacher",
            f"{self.teacher!r} is not one of {TEACHERS}",
        )
        self.budget_probs = [float(p) for p in self.budget_probs]
        if self.budget_probs:
            require(
                all(p >= 0 for p in self.budget_probs) and abs(sum(self.budget_probs) - 1) < 1e-6,
                "qad_train.budget_probs",
                f"{self.budget_probs} must be >= 0 and sum to 1",
            )

    def lr_at(self, step: int) -> float:
        """The learning rate of ``step``."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, self.steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        floor = self.lr * self.min_lr_ratio
        return floor + 0.5 * (self.lr - floor) * (1.0 + math.cos(math.pi * progress))
