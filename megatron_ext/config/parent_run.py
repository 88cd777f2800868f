"""The model shape of a parent run, read from its own ``config.yaml``."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from megatron_ext.config.compose import section, to_plain
from megatron_ext.models.config import ConfigError, HybridModelConfig
from megatron_ext.run_format import CONFIG, config_path, read_config
from megatron_ext.runtime import main_print


def parent_model(cfg: DictConfig, parent_dir: Path) -> HybridModelConfig:
    """The parent's model shape from its ``config.yaml`` (else ``cfg``'s ``model``)."""
    path = config_path(parent_dir)
    if not path.is_file():
        raise ConfigError(f"parent.dir: {parent_dir} has no {CONFIG} (not a train-parent run)")
    parent = read_config(parent_dir)
    if not isinstance(parent, DictConfig):
        raise ConfigError(f"parent.dir: {path} is not a mapping")
    if "model" not in parent:
        return section(cfg, "model", HybridModelConfig)
    model = section(parent, "model", HybridModelConfig)
    if "model" in cfg and to_plain(cfg)["model"] != OmegaConf.to_container(parent.model):
        main_print(f"note: using the parent's model config from {path}, not this run's `model`")
    return model
