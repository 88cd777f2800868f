"""Typed, validated dataclasses for everything a recipe reads besides the model shape.

Each one is a Hydra structured config (see :mod:`megatron_ext.config.registry`), so an
unknown key or a wrongly typed value fails at composition, and ``__post_init__`` checks the
values, naming the field and what to change.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_ext.models.config import require


@dataclass
class RunConfig:
    """Where a run writes, how it is seeded, and whether it resumes."""

    dir: str = "runs/default"
    seed: int = 1234
    resume: bool = True

    def __post_init__(self) -> None:
        require(bool(self.dir), "run.dir", "must name a directory")
        require(self.seed >= 0, "run.seed", "must be >= 0")


@dataclass
class DataConfig:
    """The corpus and its tokenized, indexed form.

    ``source_dir`` empty means the running interpreter's standard-library sources.
    """

    source_dir: str = ""
    glob: str = "**/*.py"
    cache_dir: str = "runs/data"
    name: str = "stdlib"
    tokenizer: str = "byte"
    tokenizer_path: str = ""
    valid_fraction: float = 0.05
    max_files: int = 0
    max_bytes: int = 0

    def __post_init__(self) -> None:
        require(self.tokenizer in ("byte", "hf"), "data.tokenizer", "must be 'byte' or 'hf'")
        require(
            self.tokenizer != "hf" or bool(self.tokenizer_path),
            "data.tokenizer_path",
            "is required with data.tokenizer=hf (path to a tokenizer.json)",
        )
        require(0.0 < self.valid_fraction < 1.0, "data.valid_fraction", "must be in (0, 1)")
        require(self.max_files >= 0, "data.max_files", "must be >= 0 (0 = no limit)")
        require(self.max_bytes >= 0, "data.max_bytes", "must be >= 0 (0 = no limit)")


@dataclass
class TrainConfig:
    """Optimisation settings of a training recipe."""

    steps: int = 600
    micro_batch_size: int = 8
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
        require(
            0 <= self.stop_at <= self.steps,
            "train.stop_at",
            f"must be in [0, train.steps={self.steps}] (0 = no early stop)",
        )


@dataclass
class LoggerConfig:
    """Experiment logging: wandb (offline by default) or none."""

    kind: str = "wandb"
    project: str = "star-elastic"
    mode: str = "offline"

    def __post_init__(self) -> None:
        require(self.kind in ("wandb", "none"), "logger.kind", "must be 'wandb' or 'none'")
        require(
            self.mode in ("offline", "online", "disabled"),
            "logger.mode",
            "must be offline, online or disabled",
        )


@dataclass
class ClusterConfig:
    """Where the job runs. ``local`` starts torchrun itself when ``parallel.nproc > 1``."""

    kind: str = "local"

    def __post_init__(self) -> None:
        require(self.kind in ("local",), "cluster.kind", "must be 'local'")
