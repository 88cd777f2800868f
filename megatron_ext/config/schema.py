"""Typed, validated dataclasses for everything a recipe reads besides the model shape.

Each one is a Hydra structured config (see :mod:`megatron_ext.config.registry`), so an
unknown key or a wrongly typed value fails at composition, and ``__post_init__`` checks the
values, naming the field and what to change.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from dataclasses import field as default_factory_field

from megatron_ext.data.config import DATA_SOURCES as DATA_SOURCES
from megatron_ext.data.config import DataConfig as DataConfig
from megatron_ext.models.config import require
from megatron_ext.training.config import TrainConfig as TrainConfig


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
