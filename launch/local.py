"""The local launcher: run in this process, or start torchrun for ``parallel.nproc > 1``."""

from __future__ import annotations

import os
import subprocess
import sys


def under_distributed_launcher() -> bool:
    """Whether this process was started by torchrun/srun (``WORLD_SIZE`` is set)."""
    return "WORLD_SIZE" in os.environ


def torchrun_command(nproc: int, recipe: str, overrides: list[str]) -> list[str]:
    """The torchrun command that runs ``recipe`` with ``overrides`` on ``nproc`` local ranks."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "recipes.cli",
        recipe,
        *overrides,
    ]


def launch_torchrun(nproc: int, recipe: str, overrides: list[str]) -> int:
    """Start ``nproc`` ranks with torchrun and wait; return its exit code."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return subprocess.run(
        torchrun_command(nproc, recipe, overrides), env=env, check=False
    ).returncode
