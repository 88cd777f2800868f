"""``star-elastic <recipe> [hydra overrides...]``: the single command-line entry point."""

from __future__ import annotations

import importlib
import sys
import warnings

RECIPES: dict[str, tuple[str, str, str]] = {
    # name: (config file, module, one-line description)
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
    lines += ["", "Overrides are Hydra syntax, e.g. model=nano_v3 parallel=tp2 run.dir=runs/x"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Compose the recipe's config, start torchrun if needed, and run the recipe."""
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
    if recipe not in RECIPES:
        print(f"unknown recipe {recipe!r}\n\n{usage()}", file=sys.stderr)
        return 2
    from launch.local import launch_torchrun, under_distributed_launcher
    from megatron_ext.config.compose import compose_recipe
    from megatron_ext.models.config import ConfigError

    config_name, module_name, _ = RECIPES[recipe]
    try:
        cfg = compose_recipe(config_name, overrides)
        if "cluster" in cfg and cfg.cluster.kind == "slurm":
            from launch.slurm import in_slurm_job, submit

            if not in_slurm_job():  # inside, the job script already runs this with cluster=local
                return submit(recipe, overrides, cfg)
        nproc = int(cfg.parallel.nproc) if "parallel" in cfg else 1
        if nproc > 1 and not under_distributed_launcher():
            return launch_torchrun(nproc, recipe, overrides)
        importlib.import_module(module_name).run(cfg)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
