"""Start a run from another run's weights (``train.init_from``): fine-tuning a parent."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from megatron_ext.checkpoint import MANIFEST, CheckpointError, CheckpointManager
from megatron_ext.models.config import (
    ConfigError,
    HybridModelConfig,
    load_model_config,
)
from megatron_ext.run_format import MODEL_CONFIG, checkpoints_dir

SHAPE_IGNORED = ("name",)
"""Model fields that may differ between the source run and the fine-tuning run."""


def resolve_init_checkpoint(source: str | Path, pg_collection) -> Path:
    """The checkpoint directory ``source`` names.

    ``source`` is a run directory (its ``checkpoints/``' newest valid one), a checkpoint root
    (its newest valid one) or one checkpoint (``iter_*`` with a manifest).
    """
    path = Path(source)
    if (path / MANIFEST).is_file():
        return path
    root = checkpoints_dir(path) if checkpoints_dir(path).is_dir() else path
    latest = CheckpointManager(root, pg_collection).latest_valid()
    if latest is None:
        raise ConfigError(f"train.init_from: no valid checkpoint under {root}")
    return latest


def _source_model_config(checkpoint: Path) -> HybridModelConfig | None:
    """The model config saved beside ``checkpoint`` (in it, its root, or its run), if any."""
    for directory in (checkpoint, checkpoint.parent, checkpoint.parent.parent):
        if (directory / MODEL_CONFIG).is_file():
            return load_model_config(directory)
    return None


def check_same_shape(source: HybridModelConfig, target: HybridModelConfig, where: str) -> None:
    """Raise :class:`ConfigError` naming every model field that differs (but the name)."""
    a, b = dataclasses.asdict(source), dataclasses.asdict(target)
    diff = [
        f"{k}: {a[k]!r} there, {b[k]!r} here" for k in a if k not in SHAPE_IGNORED and a[k] != b[k]
    ]
    if diff:
        raise ConfigError(
            f"train.init_from: {where} has another model shape ({'; '.join(diff)}); "
            "select the same model config (e.g. model=<its name>) or overrides"
        )


def load_initial_weights(
    model: torch.nn.Module, source: str | Path, model_cfg: HybridModelConfig, pg_collection
) -> Path:
    """Load the weights of ``source`` (see :func:`resolve_init_checkpoint`) into ``model``.

    Only the weights: the optimizer, step, RNG and data position start fresh. The shapes must
    match ``model_cfg`` (checked against the source's ``model_config.json`` when it has one).
    Returns the checkpoint loaded.
    """
    checkpoint = resolve_init_checkpoint(source, pg_collection)
    saved = _source_model_config(checkpoint)
    if saved is not None:
        check_same_shape(saved, model_cfg, str(source))
    try:
        CheckpointManager(checkpoint.parent, pg_collection).load(
            checkpoint, model, weights_only=True
        )
    except CheckpointError as err:
        raise ConfigError(f"train.init_from: {err}") from err
    return checkpoint
