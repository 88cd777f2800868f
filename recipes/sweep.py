"""``star-elastic-sweep <recipe> [hydra args...]``: a recipe under ``@hydra.main``, for sweeps.

Hydra's launcher plugins only run applications started through ``@hydra.main``, so this thin
entry point exists next to ``star-elastic``: it picks the recipe's config, composes it the
way Hydra does, and calls the same ``run(cfg)``. A Slurm sweep through hydra-submitit-launcher
(the ``slurm`` extra)::

    star-elastic-sweep model-info -m hydra/launcher=submitit_slurm \\
        hydra.launcher.partition=batch model=tiny_hybrid,nano_v3 \\
        'run.dir=runs/sweep/${hydra:job.num}'

Every Hydra flag works (``--cfg job``, ``-m``, ``hydra.sweep.dir=...``). Without a recipe
name it runs ``train-parent``. Multi-rank jobs: with ``hydra.launcher.tasks_per_node=N``
each submitit task becomes one rank; locally, ``parallel.nproc > 1`` starts torchrun.
"""

from __future__ import annotations

from megatron_ext.compat import ensure_compat

# this module is an entry point (star-elastic-sweep) and composes configs at import time: the
# shims go in before megatron-core's model modules are imported
ensure_compat()

import importlib  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from megatron_ext.config.compose import conf_dir  # noqa: E402
from megatron_ext.config.registry import register_schemas  # noqa: E402
from recipes.cli import RECIPES, usage  # noqa: E402


def _recipe_of(config_name: str | None) -> str:
    for name, (config, _, _) in RECIPES.items():
        if config == config_name:
            return name
    raise ValueError(f"no recipe uses the config {config_name!r}")


def _ranks_from_submitit() -> None:
    """Under a multi-task submitit job, export torch.distributed's variables from Slurm's."""
    if "WORLD_SIZE" in os.environ or os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return
    import submitit

    job = submitit.JobEnvironment()
    if job.num_tasks > 1:
        os.environ.update(
            RANK=str(job.global_rank),
            LOCAL_RANK=str(job.local_rank),
            WORLD_SIZE=str(job.num_tasks),
            MASTER_ADDR=job.hostnames[0],
            MASTER_PORT=str(20000 + int(str(job.job_id).split("_")[0]) % 40000),
        )


@hydra.main(config_path=str(conf_dir()), config_name="train_parent", version_base="1.3")
def sweep_job(cfg: DictConfig) -> Any:
    """One job of a (multi)run: the recipe whose config Hydra composed, on ``cfg``."""
    from hydra.core.hydra_config import HydraConfig

    from launch.local import launch_torchrun, under_distributed_launcher

    hydra_cfg = HydraConfig.get()
    recipe = _recipe_of(hydra_cfg.job.config_name)
    _ranks_from_submitit()
    nproc = int(cfg.parallel.nproc) if "parallel" in cfg else 1
    if nproc > 1 and not under_distributed_launcher():
        code = launch_torchrun(nproc, recipe, list(hydra_cfg.overrides.task))
        if code:
            raise RuntimeError(f"{recipe}: torchrun exited with {code}")
        return None
    from megatron_ext.compat.engine import apply_engine_shims

    apply_engine_shims()  # the engine's shims too, before the recipe runs
    return importlib.import_module(RECIPES[recipe][1]).run(cfg)


def main(argv: list[str] | None = None) -> int:
    """``star-elastic-sweep [<recipe>] [hydra args...]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help", "help"):
        print(usage().replace("star-elastic <recipe>", "star-elastic-sweep [<recipe>]"))
        print("Hydra flags work too: --cfg job, -m (multirun), hydra/launcher=submitit_slurm")
        return 0
    if argv and not argv[0].startswith("-") and "=" not in argv[0]:
        recipe = argv.pop(0)
        if recipe not in RECIPES:
            print(f"unknown recipe {recipe!r}\n\n{usage()}", file=sys.stderr)
            return 2
        argv.insert(0, f"--config-name={RECIPES[recipe][0]}")
    register_schemas()
    sys.argv = [sys.argv[0], *argv]
    sweep_job()
    return 0


if __name__ == "__main__":
    sys.exit(main())
