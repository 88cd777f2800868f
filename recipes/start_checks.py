"""The checks the launcher runs before any rank starts and before ``run.dir`` is written.

Everything that needs only the config and the files it names, beyond the layout checks of
:mod:`megatron_ext.config.preflight`: every config group's own validation, the source
directories and their checkpoints, the elastic widths against TP / EP, the curriculum, and
whether a training run can resume.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from megatron_ext.checkpoint import CheckpointError, CheckpointManager
from megatron_ext.config.compose import section
from megatron_ext.config.schema import DataConfig, RunConfig, TrainConfig
from megatron_ext.elastic.budget_eval import load_choices
from megatron_ext.elastic.config import ElasticConfig
from megatron_ext.elastic.curriculum import CurriculumConfig
from megatron_ext.elastic.train_config import ElasticTrainConfig
from megatron_ext.models.config import ConfigError, HybridModelConfig, load_model_config
from megatron_ext.parallel import ParallelConfig
from megatron_ext.run_format import MODEL_CONFIG, checkpoints_dir

TRAINING = ("train_parent", "train_elastic", "qad")
"""Config names of the recipes that resume from their own checkpoints."""

_SOURCE_OF = {
    "train_elastic": "an importance run (or set parent.dir to rank a parent first)",
    "slice": "a train-elastic run",
    "export": "a train-elastic or slice run",
    "generate": "a train-parent, train-elastic or slice run",
    "qad": "a train-elastic run",
}


def _existing_dir(cfg: DictConfig, key: str, what: str) -> Path | None:
    node = cfg.get(key.split(".")[0])
    value = str(node.get("dir") or "") if node is not None else ""
    if not value:
        return None
    path = Path(value)
    if not path.is_dir():
        raise ConfigError(f"{key}: {path} does not exist; point it at {what}")
    return path


def _has_valid_checkpoint(key: str, run_dir: Path) -> None:
    """Raise ``CheckpointError`` when ``run_dir/checkpoints`` holds checkpoints, none valid."""
    root = checkpoints_dir(run_dir)
    found, bad = CheckpointManager(root, None).scan()
    if found is None and bad:
        listing = "; ".join(f"{path.name}: {why}" for path, why in bad)
        raise CheckpointError(f"{key}: no valid checkpoint under {root} ({listing})")


def _model_of(cfg: DictConfig, name: str) -> HybridModelConfig | None:
    """The model the recipe will build: its ``model`` group, else ``source.dir``'s saved one."""
    if "model" in cfg:
        return section(cfg, "model", HybridModelConfig)
    source = Path(str(cfg.source.dir)) if "source" in cfg and cfg.source.get("dir") else None
    if source is not None and (source / MODEL_CONFIG).is_file():
        return load_model_config(source)
    return None


def check_before_start(name: str, cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` (or ``CheckpointError``) for recipe config ``name``."""
    run = section(cfg, "run", RunConfig) if "run" in cfg else None
    data = section(cfg, "data", DataConfig) if "data" in cfg else None
    files = data is not None and data.source == "files" and bool(data.source_dir)
    if files and data is not None and not Path(data.source_dir).is_dir():
        raise ConfigError(
            f"data.source_dir: {data.source_dir} does not exist; point it at a folder of "
            "text files (empty: the Python standard library's sources)"
        )
    parallel = section(cfg, "parallel", ParallelConfig) if "parallel" in cfg else ParallelConfig()
    parent = _existing_dir(cfg, "parent.dir", "a train-parent run")
    if name in _SOURCE_OF and "source" in cfg:
        source = Path(str(cfg.source.dir))
        if not source.is_dir() and not (name == "train_elastic" and parent is not None):
            raise ConfigError(
                f"source.dir: {source} does not exist; point it at {_SOURCE_OF[name]}"
            )
        if source.is_dir():
            load_choices(source)  # a corrupt budget_choices.json: CheckpointError naming it
            _has_valid_checkpoint("source.dir", source)
    if parent is not None:
        _has_valid_checkpoint("parent.dir", parent)
    if "train" in cfg:
        section(cfg, "train", TrainConfig)
    model = _model_of(cfg, name)
    if model is not None and "elastic" in cfg:
        # train-elastic and qad build the elastic model at their own layout; the others at TP=1
        at = parallel if name in ("train_elastic", "qad") else ParallelConfig()
        section(cfg, "elastic", ElasticConfig).validate_for(model, at)
    if "curriculum" in cfg and "elastic_train" in cfg:
        train = section(cfg, "elastic_train", ElasticTrainConfig)
        budgets = len(section(cfg, "elastic", ElasticConfig).budgets)
        curriculum = section(cfg, "curriculum", CurriculumConfig)
        curriculum.resolve(train.micro_batch_size * parallel.dp, budgets)
    if name in TRAINING and run is not None and run.resume:
        root = checkpoints_dir(run.dir)
        CheckpointManager(root, None).check_resumable(run.restart_from_scratch)
