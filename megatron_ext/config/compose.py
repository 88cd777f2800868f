"""Compose a recipe's config with Hydra and turn its groups into validated dataclasses."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from megatron_ext.config.registry import register_schemas
from megatron_ext.config.source_run import take_tokenizer_from_run
from megatron_ext.models.config import ConfigError

T = TypeVar("T")


def conf_dir() -> Path:
    """The ``conf/`` tree shipped next to the packages."""
    return Path(__file__).resolve().parents[2] / "conf"


def compose_recipe(config_name: str, overrides: list[str]) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with command-line ``overrides``.

    A recipe that reads a run (``source.dir`` / ``parent.dir``) gets that run's tokenizer
    unless ``overrides`` name one (:mod:`megatron_ext.config.source_run`).
    Raises :class:`ConfigError` with Hydra's message (which names the key) on a bad override.
    """
    register_schemas()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"{config_name}: {err}") from err
    take_tokenizer_from_run(cfg, overrides)
    return cfg


def section(cfg: DictConfig, name: str, kind: type[T]) -> T:
    """Group ``name`` of ``cfg`` as a validated ``kind`` instance (runs ``__post_init__``)."""
    node = cfg.get(name)
    if node is None:
        raise ConfigError(f"{name}: missing from the config")
    try:
        obj = OmegaConf.to_object(node)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{name}: {err}") from err
    if not isinstance(obj, kind):
        obj = kind(**obj)  # type: ignore[arg-type]
    return obj  # type: ignore[return-value]


def to_plain(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain containers (for logging and ``config.yaml``)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
