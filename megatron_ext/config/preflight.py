"""Checks of a composed recipe config that must pass before any rank is started.

:func:`check_layout` validates the ``parallel`` group against the model it will split (the
recipe's ``model``, or the ``model_config.json`` of the run it reads) and refuses a pipeline
layout (``parallel.pp > 1``) for a recipe that cannot run one. The launcher calls it before
torchrun or sbatch, so a bad layout costs no start-up and writes nothing.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from megatron_ext.config.compose import section
from megatron_ext.models.config import (
    ConfigError,
    HybridModelConfig,
    load_model_config,
)
from megatron_ext.parallel import ParallelConfig
from megatron_ext.run_format import MODEL_CONFIG

PIPELINED_RECIPES: frozenset[str] = frozenset({"train-parent", "train-elastic", "qad"})
"""Recipes whose training steps run on megatron-core's pipeline schedules (``pp > 1``)."""

CONTEXT_PARALLEL_RECIPES: frozenset[str] = frozenset({"train-parent"})
"""Recipes whose steps split sequences over context-parallel ranks (``cp > 1``)."""

READS_ANY_PP = frozenset({"importance", "model-info"})
"""Recipes that run unpipelined and read checkpoints saved at any ``pp``."""


def _model(cfg: DictConfig) -> HybridModelConfig | None:
    """The model the run splits: from the run it reads when that has one, else ``model``."""
    for group in ("source", "parent"):
        node = cfg.get(group)
        directory = node.get("dir") if node is not None else None
        if directory and (Path(str(directory)) / MODEL_CONFIG).is_file():
            return load_model_config(str(directory))
    if "model" in cfg:
        return section(cfg, "model", HybridModelConfig)
    return None


def check_qad_layout(parallel: ParallelConfig, export: bool, task_prompts: int = 0) -> None:
    """Raise :class:`ConfigError` for a qad layout it cannot run: ``export=true`` or
    ``qad_train.task_prompts`` on several ranks (the quantized Hugging Face export is written,
    and the task is generated, from one unsharded process)."""
    if task_prompts and parallel.nproc > 1:
        raise ConfigError(
            f"qad_train.task_prompts: the task accuracy is generated in one process, not on "
            f"parallel.nproc={parallel.nproc} ranks; set qad_train.task_prompts=0 (the held-out "
            "figures are measured at any layout), or use parallel=single"
        )
    if export and parallel.nproc > 1:
        raise ConfigError(
            f"export: qad writes the quantized Hugging Face exports from one process, not "
            f"from parallel.nproc={parallel.nproc} ranks; set export=false (the QAD "
            "checkpoint and quant_state.json are saved at any layout), or use parallel=single"
        )


def check_layout(recipe: str, cfg: DictConfig) -> ParallelConfig | None:
    """Validate ``cfg.parallel`` for ``recipe``; returns it (``None`` without the group).

    Raises :class:`ConfigError` naming the field: a layout the model cannot split into,
    ``parallel.pp > 1`` for a recipe that does not run pipeline stages, ``parallel.cp > 1``
    for a recipe other than train-parent, together with TP or PP, or with a sequence length
    it cannot split.
    """
    if "parallel" not in cfg:
        return None
    parallel = section(cfg, "parallel", ParallelConfig)
    if parallel.cp > 1 and recipe not in CONTEXT_PARALLEL_RECIPES:
        raise ConfigError(
            f"parallel.cp: {parallel.cp} is not supported by {recipe} (only train-parent "
            "splits sequences over context-parallel ranks); set 1"
        )
    if parallel.cp > 1 and (parallel.tp > 1 or parallel.pp > 1):
        field, size = ("tp", parallel.tp) if parallel.tp > 1 else ("pp", parallel.pp)
        raise ConfigError(
            f"parallel.cp: {parallel.cp} together with parallel.{field}={size} "
            "is refused (context parallelism is tested only with data and expert parallelism, "
            "against cp=1); set parallel.cp=1, or parallel.tp=1 and parallel.pp=1"
        )
    if recipe == "qad":
        qad = cfg.get("qad_train") or {}
        check_qad_layout(
            parallel, bool(cfg.get("export", False)), int(qad.get("task_prompts", 0) or 0)
        )
    model = _model(cfg)
    if model is not None:
        parallel.check_model(model)
    if parallel.pp > 1 and recipe not in PIPELINED_RECIPES:
        if recipe in READS_ANY_PP:
            why = f"{recipe} runs unpipelined; it reads checkpoints saved at any pp"
        else:
            why = f"{recipe} does not run pipeline stages yet"
        raise ConfigError(f"parallel.pp: {parallel.pp} is not supported here ({why}); set 1")
    if parallel.cp > 1:
        train = cfg.get("train")
        seq = train.get("seq_length") if train is not None else None
        if seq is not None and int(seq) % (2 * parallel.cp):
            raise ConfigError(
                f"train.seq_length: {seq} is not divisible by 2*parallel.cp = "
                f"{2 * parallel.cp} (each context-parallel rank holds two equal chunks)"
            )
    return parallel
