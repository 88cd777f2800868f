"""The Slurm launcher: render ``slurm/train.sbatch`` from the config, then ``sbatch`` it.

The job runs the same command line with ``cluster=local``, as one Slurm task per rank
(``srun``; ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` from Slurm's, rendezvous on the first node).
Tasks rather than one torchrun per node, because then Slurm's signals reach every rank:
torchrun does not forward ``SIGUSR1`` to its workers, it dies of it. A rank that gets
``SIGUSR1`` (``--signal=USR1@120``) or ``SIGTERM`` checkpoints and exits with
``REQUEUE_EXIT_CODE``; the script then runs ``scontrol requeue`` and the next start resumes.

Quoting: every value from the config or the command line is ``shlex.quote``d; values that
go into ``#SBATCH`` lines unquoted (partition, account, time, extra options) are validated by
:class:`~megatron_ext.config.schema.ClusterConfig`, and quoted ones may hold no newline.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig

from megatron_ext.config.compose import section
from megatron_ext.config.schema import ClusterConfig, RunConfig
from megatron_ext.models.config import ConfigError, HybridModelConfig
from megatron_ext.parallel import ParallelConfig
from megatron_ext.training.preemption import REQUEUE_EXIT_CODE

IN_SLURM_ENV = "STAR_ELASTIC_IN_SLURM"
TEMPLATE = Path(__file__).resolve().parents[1] / "slurm" / "train.sbatch"
# With cluster.port=0: a port from the job id and restart count, so two jobs sharing a node,
# or a requeued job restarting at once, do not meet a port still held by another.
DERIVED_PORT = "$(( 20000 + (SLURM_JOB_ID * 7 + ${SLURM_RESTART_COUNT:-0}) % 40000 ))"
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
_CLUSTER_OVERRIDE = re.compile(r"^(\+\+|\+|~)?cluster([.=]|$)")


def in_slurm_job() -> bool:
    """Whether this process is the job the sbatch script started (it must not submit)."""
    return os.environ.get(IN_SLURM_ENV) == "1"


def job_overrides(overrides: list[str]) -> list[str]:
    """The overrides the job runs with: the user's without any ``cluster``, + ``cluster=local``."""
    kept = [o for o in overrides if not _CLUSTER_OVERRIDE.match(o)]
    return [*kept, "cluster=local"]


def _quote_directive(value: str, field: str) -> str:
    """A quoted ``#SBATCH`` value; sbatch unquotes it, a newline would end the comment."""
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ConfigError(f"{field}: {value!r} must not contain newlines or control characters")
    return shlex.quote(value)


def _world_layout(cfg: DictConfig, cluster: ClusterConfig) -> int:
    """Tasks per node from ``parallel.nproc`` (the world size), checked before queueing: the
    split over nodes and GPUs, and the TP/EP split of the model."""
    nproc = 1
    if "parallel" in cfg:
        parallel = section(cfg, "parallel", ParallelConfig)
        if "model" in cfg:
            parallel.check_model(section(cfg, "model", HybridModelConfig))
        nproc = parallel.nproc
    if nproc % cluster.nodes:
        raise ConfigError(
            f"parallel.nproc: {nproc} ranks do not split over cluster.nodes={cluster.nodes} "
            "(parallel.nproc is the world size: nodes x ranks per node)"
        )
    per_node = nproc // cluster.nodes
    if cluster.gpus_per_node and per_node != cluster.gpus_per_node:
        raise ConfigError(
            f"parallel.nproc: {nproc} ranks on {cluster.nodes} node(s) is {per_node} per node, "
            f"but cluster.gpus_per_node={cluster.gpus_per_node}; set parallel.nproc="
            f"{cluster.nodes * cluster.gpus_per_node} (one rank per GPU)"
        )
    return per_node


def _paths(cfg: DictConfig, cluster: ClusterConfig) -> tuple[Path, Path]:
    """The job's working directory and the directory for its script and log (both absolute)."""
    workdir = Path(cluster.workdir or os.getcwd()).absolute()
    run_dir = Path(section(cfg, "run", RunConfig).dir) if "run" in cfg else Path("runs")
    if not run_dir.is_absolute():
        run_dir = workdir / run_dir
    return workdir, run_dir / "slurm"


def _directives(cluster: ClusterConfig) -> list[str]:
    lines = []
    if cluster.partition:
        lines.append(f"--partition={cluster.partition}")
    if cluster.account:
        lines.append(f"--account={cluster.account}")
    if cluster.time:
        lines.append(f"--time={cluster.time}")
    if cluster.gpus_per_node:
        lines.append(f"--gpus-per-node={cluster.gpus_per_node}")
    if cluster.signal_seconds:
        lines.append(f"--signal=USR1@{cluster.signal_seconds}")
    lines.append("--requeue" if cluster.requeue else "--no-requeue")
    lines += list(cluster.extra_sbatch)
    return [f"#SBATCH {line}" for line in lines]


def render(recipe: str, overrides: list[str], cfg: DictConfig) -> str:
    """The sbatch script that runs ``star-elastic <recipe> <overrides> cluster=local``."""
    cluster = section(cfg, "cluster", ClusterConfig)
    per_node = _world_layout(cfg, cluster)
    workdir, slurm_dir = _paths(cfg, cluster)
    program = [cluster.python or sys.executable, "-m", "recipes.cli", recipe]
    lines = [" ".join(shlex.quote(part) for part in program)]
    lines += [shlex.quote(part) for part in job_overrides(overrides)]
    env = [f"export {key}={shlex.quote(str(value))}" for key, value in cluster.env.items()]
    values = {
        "recipe": recipe if re.fullmatch(r"[a-z-]+", recipe) else "job",
        "job_name": _quote_directive(
            cluster.job_name or f"star-elastic-{recipe}", "cluster.job_name"
        ),
        "nodes": str(cluster.nodes),
        "ntasks_per_node": str(per_node),
        "cpus_per_task": str(cluster.cpus_per_task),
        "log": _quote_directive(str(slurm_dir / "slurm-%j.out"), "run.dir"),
        "directives": "\n".join(_directives(cluster)),
        "requeue_exit_code": str(REQUEUE_EXIT_CODE),
        "requeue": "1" if cluster.requeue else "0",
        "workdir": shlex.quote(str(workdir)),
        "port": str(cluster.port) if cluster.port else DERIVED_PORT,
        "env": "\n".join(env),
        "command": " \\\n  ".join(lines),
    }

    def fill(match: re.Match[str]) -> str:
        return values[match.group(1)]

    return _PLACEHOLDER.sub(fill, TEMPLATE.read_text())


def submit(recipe: str, overrides: list[str], cfg: DictConfig) -> int:
    """Render the script; print it (``cluster.dry_run``) or write it and ``sbatch`` it.

    Returns the exit code for the command line: sbatch's (with ``cluster.wait``, the job's).
    """
    cluster = section(cfg, "cluster", ClusterConfig)
    script = render(recipe, overrides, cfg)
    if cluster.dry_run:
        print(script, end="")
        return 0
    _, slurm_dir = _paths(cfg, cluster)
    slurm_dir.mkdir(parents=True, exist_ok=True)
    path = slurm_dir / f"{recipe}.sbatch"
    path.write_text(script)
    cmd = ["sbatch", "--parsable", *(["--wait"] if cluster.wait else []), str(path)]
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    except FileNotFoundError:
        print("sbatch not found: is this a Slurm login node?", file=sys.stderr)
        return 127
    assert proc.stdout is not None
    first = proc.stdout.readline().strip()  # "<job id>[;<cluster>]", printed at submission
    if first:
        job_id = first.split(";")[0]
        log = slurm_dir / f"slurm-{job_id}.out"
        print(f"submitted batch job {job_id}\n  script: {path}\n  log:    {log}", flush=True)
    rest = proc.stdout.read()
    if rest.strip():
        print(rest, end="")
    return proc.wait()
