"""``star-elastic <recipe> [hydra overrides...]``: the single command-line entry point."""

from __future__ import annotations

import importlib
import sys
import warnings

RECIPES: dict[str, tuple[str, str, str]] = {
    # name: (config file, module, one-line description)
    "import-hf": (
        "import_hf",
        "recipes.import_hf",
        "a Hugging Face checkpoint (Nemotron-H, Llama, Qwen3) as a parent run",
    ),
    "prepare-data": (
        "prepare_data",
        "recipes.prepare_data",
        "tokenize a corpus into indexed datasets",
    ),
    "train-parent": ("train_parent", "recipes.train_parent", "train the non-elastic parent model"),
    "importance": (
        "importance",
        "recipes.importance",
        "rank components by importance and reorder the parent",
    ),
    "train-elastic": (
        "train_elastic",
        "recipes.train_elastic",
        "train the elastic model: router + KD from the frozen parent, curriculum",
    ),
    "slice": (
        "slice",
        "recipes.slice",
        "write a standalone smaller checkpoint per budget, zero-shot",
    ),
    "export": (
        "export",
        "recipes.export",
        "export a budget's slice as megatron, Hugging Face or NeMo",
    ),
    "generate": (
        "generate",
        "recipes.generate",
        "decode with KV/SSM caches; think at one budget, answer at another",
    ),
    "qad": (
        "qad",
        "recipes.qad",
        "quantize an elastic checkpoint (FP8 / NVFP4): PTQ, then QAD from the frozen model",
    ),
    "report": (
        "report",
        "recipes.report",
        "one Markdown report with plots from the pipeline's run directories",
    ),
    "model-info": (
        "model_info",
        "recipes.model_info",
        "count a model's total and active parameters",
    ),
}


def usage() -> str:
    """The help text listing every recipe."""
    lines = ["usage: star-elastic <recipe> [key=value ...]", "", "recipes:"]
    lines += [f"  {name:<14} {desc}" for name, (_, _, desc) in RECIPES.items()]
    lines += [f"  {'plan':<14} {PLAN_DESC}"]
    lines += ["", "Overrides are Hydra syntax, e.g. model=nano_v3 parallel=tp2 run.dir=runs/x"]
    lines += ["star-elastic <recipe> --help: the recipe's config groups and default config"]
    lines += ["star-elastic <recipe> [overrides] --cfg job: the composed config, nothing run"]
    return "\n".join(lines)


def recipe_help(recipe: str, overrides: list[str], title: str = "", desc: str = "") -> str:
    """``<recipe> --help``: what it does, its config groups and options, its composed config.

    ``title`` / ``desc`` name the command when it is not the recipe itself (``plan``).
    """
    from omegaconf import OmegaConf

    from megatron_ext.config.compose import compose_recipe, conf_dir

    config_name, _, recipe_desc = RECIPES[recipe]
    cfg = compose_recipe(config_name, overrides)
    groups = []
    for group in sorted(p for p in conf_dir().iterdir() if p.is_dir()):
        if group.name in cfg:
            options = sorted(f.stem for f in group.glob("*.yaml"))
            groups.append(f"  {group.name:<14} {', '.join(options)}")
    head = f"star-elastic {title or recipe}: {desc or recipe_desc}"
    lines = [head, "", f"config: conf/{config_name}.yaml"]
    lines += ["", "config groups (choose with group=option):", *groups]
    lines += ["", "composed config (override any key with key=value):", OmegaConf.to_yaml(cfg)]
    return "\n".join(lines)


def _cfg_flag(overrides: list[str]) -> tuple[list[str], str | None]:
    """Split Hydra's ``--cfg job|all|hydra`` (or ``-c``) off the overrides."""
    for flag in ("--cfg", "-c"):
        if flag in overrides:
            i = overrides.index(flag)
            what = overrides[i + 1] if i + 1 < len(overrides) else "job"
            return overrides[:i] + overrides[i + 2 :], what
    return overrides, None


def _print_cfg(cfg, what: str) -> None:
    """``--cfg job|all``: the composed config; ``ConfigError`` for any other part."""
    from omegaconf import OmegaConf

    from megatron_ext.models.config import ConfigError

    if what not in ("job", "all"):
        raise ConfigError(f"--cfg: {what!r} is not 'job' or 'all'")
    print(OmegaConf.to_yaml(cfg))


PLANNED = ("train-elastic", "train-parent")  # the recipes `plan` knows; slurm plans them first


PLAN_DESC = "per-rank memory of train-elastic (or: plan train-parent ...); nothing is built"


def plan_main(overrides: list[str]) -> int:
    """``plan [train-elastic|train-parent] [overrides]``: print the plan; 2 if it cannot fit.

    ``--help`` and ``--cfg job`` answer as for the recipes, with the planned recipe's config.
    """
    from megatron_ext.config.compose import compose_recipe
    from megatron_ext.models.config import ConfigError

    recipe = "train-elastic"
    if overrides and overrides[0] in PLANNED:
        recipe, overrides = overrides[0], overrides[1:]
    overrides, show_cfg = _cfg_flag(overrides)
    try:
        if "--help" in overrides or "-h" in overrides:
            rest = [o for o in overrides if o not in ("--help", "-h")]
            desc = f"per-rank memory of {recipe}; nothing is built"
            print(recipe_help(recipe, rest, title=f"plan {recipe}", desc=desc))
            return 0
        cfg = compose_recipe(RECIPES[recipe][0], overrides)
        if show_cfg is not None:
            _print_cfg(cfg, show_cfg)
            return 0
        importlib.import_module("recipes.plan").run(cfg, recipe)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """Compose the recipe's config, start torchrun if needed, and run the recipe."""
    from launch.local import die_with_launcher

    die_with_launcher()  # first: a rank of launch_torchrun ends when the launcher does
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    recipe, overrides = argv[0], argv[1:]
    # megatron-core warns at import that TE/Apex are absent (summary.json reports backends)
    # and about a cuda-graph default this project never uses.
    noisy = (
        ".*Apex (is|are) not installed",
        ".*full scope is deprecated",
        ".*`load_state_dict` is deprecated",
        ".*Please use DTensor instead",
    )
    for noise in noisy:
        warnings.filterwarnings("ignore", message=noise)
    # The distributed optimizer's fp32 shards are views of the parameters that keep autograd
    # (0.16.1 optimizer/distrib_optimizer.py 421), so its zero_grad (optimizer/optimizer.py 66)
    # reads .grad of a non-leaf tensor; it sets those .grad fields itself, so this is noise.
    warnings.filterwarnings(
        "ignore", message=".*a Tensor that is not a leaf", module=r"megatron\.core\.optimizer"
    )
    from megatron_ext.compat import ensure_compat

    ensure_compat()  # the entry point's shims, before any megatron-core model module is imported
    if recipe == "plan":
        return plan_main(overrides)
    if recipe not in RECIPES:
        print(f"unknown recipe {recipe!r}\n\n{usage()}", file=sys.stderr)
        return 2
    from launch.local import launch_torchrun, under_distributed_launcher
    from megatron_ext.checkpoint import CheckpointError
    from megatron_ext.compat.engine import apply_engine_shims
    from megatron_ext.config.compose import compose_recipe
    from megatron_ext.config.preflight import check_layout
    from megatron_ext.data.prepare import DataError
    from megatron_ext.models.config import ConfigError
    from megatron_ext.run_lock import HELD_BY_LAUNCHER, RunDirLocked, RunLock, needs_own_lock
    from megatron_ext.training.engine_config import check_batch_layout
    from recipes.start_checks import check_before_start

    config_name, module_name, _ = RECIPES[recipe]
    overrides, show_cfg = _cfg_flag(overrides)
    ranked = under_distributed_launcher()
    try:
        if "--help" in overrides or "-h" in overrides:
            print(recipe_help(recipe, [o for o in overrides if o not in ("--help", "-h")]))
            return 0
        cfg = compose_recipe(config_name, overrides)
        if show_cfg is not None:
            _print_cfg(cfg, show_cfg)
            return 0
        check_layout(recipe, cfg)  # before torchrun or sbatch: a bad layout starts nothing
        check_batch_layout(cfg)  # a global batch that does not split over DP, likewise
        if not ranked:  # once, on the launcher: before torchrun/sbatch and any write
            check_before_start(config_name, cfg)
        if "cluster" in cfg and cfg.cluster.kind == "slurm":
            from launch.slurm import in_slurm_job, submit

            if not in_slurm_job():  # inside, the job script already runs this with cluster=local
                if recipe in PLANNED:  # refuses, naming the component, a run that cannot fit
                    importlib.import_module("recipes.plan").run(cfg, recipe, sys.stderr)
                return submit(recipe, overrides, cfg)
        run_dir = str(cfg.run.dir) if "run" in cfg and cfg.run.get("dir") else None
        lock = RunLock(run_dir) if run_dir and needs_own_lock() else None
        if lock is not None:
            lock.acquire()
        try:
            nproc = int(cfg.parallel.nproc) if "parallel" in cfg else 1
            if nproc > 1 and not ranked:
                held = {HELD_BY_LAUNCHER: str(lock.path)} if lock is not None else {}
                return launch_torchrun(nproc, recipe, overrides, held)
            apply_engine_shims()
            importlib.import_module(module_name).run(cfg)
        finally:
            if lock is not None:
                lock.release()
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except (CheckpointError, DataError, RunDirLocked) as err:
        kind = "checkpoint" if isinstance(err, CheckpointError) else "data"
        kind = "run.dir" if isinstance(err, RunDirLocked) else kind
        print(f"{kind} error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
