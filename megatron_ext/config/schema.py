"""Typed, validated dataclasses for everything a recipe reads besides the model shape.

Each one is a Hydra structured config (see :mod:`megatron_ext.config.registry`), so an
unknown key or a wrongly typed value fails at composition, and ``__post_init__`` checks the
values, naming the field and what to change.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from dataclasses import field as default_factory_field

from megatron_ext.data.arithmetic import ArithmeticConfig
from megatron_ext.models.config import require
from megatron_ext.training.engine_config import check_engine_fields

DATA_SOURCES = ("files", "arithmetic")


@dataclass
class RunConfig:
    """Where a run writes, how it is seeded, and whether it resumes.

    With ``resume`` a run continues from the newest valid checkpoint in ``dir``. When
    checkpoints exist there and none is valid it refuses to start, unless
    ``restart_from_scratch``: then it trains from step 0 (the corrupt ones are kept aside).
    """

    dir: str = "runs/default"
    seed: int = 1234
    resume: bool = True
    restart_from_scratch: bool = False

    def __post_init__(self) -> None:
        require(bool(self.dir), "run.dir", "must name a directory")
        require(self.seed >= 0, "run.seed", "must be >= 0")


@dataclass
class DataConfig:
    """The corpus and its tokenized, indexed form.

    ``source`` is ``files`` (the text files under ``source_dir`` matching ``glob``;
    ``source_dir`` empty means the running interpreter's standard-library sources) or
    ``arithmetic`` (the generated task of :mod:`megatron_ext.data.arithmetic`, configured by
    ``arithmetic``, with a held-out test split; ``source_dir``, ``glob``, ``valid_fraction``,
    ``max_files`` and ``max_bytes`` are unused).
    """

    source: str = "files"
    source_dir: str = ""
    glob: str = "**/*.py"
    cache_dir: str = "runs/data"
    name: str = "stdlib"
    tokenizer: str = "byte"
    tokenizer_path: str = ""
    valid_fraction: float = 0.05
    max_files: int = 0
    max_bytes: int = 0
    arithmetic: ArithmeticConfig = default_factory_field(default_factory=ArithmeticConfig)

    def __post_init__(self) -> None:
        require(
            self.source in DATA_SOURCES,
            "data.source",
            f"{self.source!r} is not one of {DATA_SOURCES}",
        )
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


# Values that go into ``#SBATCH`` lines unquoted must be simple (see ClusterConfig).
_SIMPLE_NAME = re.compile(r"^[A-Za-z0-9_.,-]*$")
_SLURM_TIME = re.compile(r"^(|UNLIMITED|INFINITE|(\d+-)?\d+(:\d+){0,2})$")
_SBATCH_OPTION = re.compile(r"^--[A-Za-z][A-Za-z0-9-]*(=[A-Za-z0-9_.,:=@%/+*|!-]+)?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _printable(value: str) -> bool:
    return not any(ord(c) < 32 or ord(c) == 127 for c in value)


@dataclass
class ClusterConfig:
    """Where the job runs.

    ``local`` runs in this process and starts torchrun itself when ``parallel.nproc > 1``.
    ``slurm`` renders ``slurm/train.sbatch`` and submits it (see :mod:`launch.slurm`): one
    Slurm task per rank, ``parallel.nproc`` (the world size) = ``nodes`` × tasks per node;
    ``gpus_per_node=0`` runs CPU tasks. Free-form values (``job_name``, ``env`` values,
    ``python``, ``workdir``) are shell-quoted into the script; ``partition``, ``account``,
    ``time`` and ``extra_sbatch`` must match simple patterns.
    """

    kind: str = "local"
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    partition: str = ""  # empty: the cluster's default partition
    account: str = ""
    time: str = ""  # Slurm time limit, e.g. 04:00:00 or 2-00:00:00; empty: the partition's
    job_name: str = ""  # empty: star-elastic-<recipe>
    dry_run: bool = False  # print the rendered script instead of submitting it
    wait: bool = False  # sbatch --wait: block until the job ends, exit with its code
    requeue: bool = True  # --requeue, and requeue the job when training is preempted
    signal_seconds: int = 120  # --signal=USR1@<seconds> before the time limit (0: none)
    # more #SBATCH options, e.g. ["--exclusive", "--qos=high"]
    extra_sbatch: list[str] = default_factory_field(default_factory=list)
    # exported in the job before training, e.g. +cluster.env.NCCL_DEBUG=WARN
    env: dict[str, str] = default_factory_field(default_factory=dict)
    python: str = ""  # the interpreter on the compute nodes; empty: this one (sys.executable)
    workdir: str = ""  # where the job runs; empty: the submitting working directory
    port: int = 0  # rendezvous port on the first node; 0: derived from the job id
    # memory of one GPU in GiB, which `star-elastic plan` checks every rank against (0: unknown)
    gpu_memory_gb: float = 0.0

    def __post_init__(self) -> None:
        require(self.kind in ("local", "slurm"), "cluster.kind", "must be 'local' or 'slurm'")
        require(self.nodes >= 1, "cluster.nodes", "must be >= 1")
        require(self.gpus_per_node >= 0, "cluster.gpus_per_node", "must be >= 0 (0 = CPU tasks)")
        require(self.cpus_per_task >= 1, "cluster.cpus_per_task", "must be >= 1")
        require(self.gpu_memory_gb >= 0, "cluster.gpu_memory_gb", "must be >= 0 (0 = unknown)")
        require(self.signal_seconds >= 0, "cluster.signal_seconds", "must be >= 0 (0 = none)")
        require(
            self.port == 0 or 1024 <= self.port <= 65535,
            "cluster.port",
            "must be 0 (derived from the job id) or in [1024, 65535]",
        )
        for name in ("partition", "account"):
            require(
                bool(_SIMPLE_NAME.match(getattr(self, name))),
                f"cluster.{name}",
                f"{getattr(self, name)!r} may contain only letters, digits and _ . , -",
            )
        require(
            bool(_SLURM_TIME.match(self.time)),
            "cluster.time",
            f"{self.time!r} is not a Slurm time limit (minutes, [days-]hours:minutes:seconds, "
            "days-hours, or UNLIMITED)",
        )
        require(
            _printable(self.job_name),
            "cluster.job_name",
            "must not contain newlines or other control characters",
        )
        for i, option in enumerate(self.extra_sbatch):
            require(
                bool(_SBATCH_OPTION.match(option)),
                f"cluster.extra_sbatch[{i}]",
                f"{option!r} must look like --option or --option=value, the value made only "
                "of letters, digits and _ . , : = @ % / + * | ! -",
            )
        for key, value in self.env.items():
            require(
                bool(_ENV_NAME.match(key)),
                f"cluster.env.{key}",
                "is not a valid environment variable name",
            )
            require("\0" not in str(value), f"cluster.env.{key}", "must not contain NUL")
        for name in ("python", "workdir"):
            require("\0" not in getattr(self, name), f"cluster.{name}", "must not contain NUL")
