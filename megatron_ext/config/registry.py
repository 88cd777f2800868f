"""Register the typed configs as Hydra structured configs (one schema per group)."""

from __future__ import annotations

from functools import cache

from hydra.core.config_store import ConfigStore

from megatron_ext.config.schema import (
    ClusterConfig,
    DataConfig,
    LoggerConfig,
    RunConfig,
    TrainConfig,
)
from megatron_ext.elastic.config import ElasticConfig
from megatron_ext.elastic.curriculum import CurriculumConfig
from megatron_ext.elastic.router import RouterConfig
from megatron_ext.elastic.train_config import ElasticTrainConfig
from megatron_ext.generate.config import GenerateConfig
from megatron_ext.models.config import HybridModelConfig
from megatron_ext.parallel import ParallelConfig
from megatron_ext.quant.config import QADConfig, QuantConfig
from megatron_ext.report.config import ReportConfig

SCHEMAS = {
    "model": HybridModelConfig,
    "parallel": ParallelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "logger": LoggerConfig,
    "run": RunConfig,
    "cluster": ClusterConfig,
    "elastic": ElasticConfig,
    "curriculum": CurriculumConfig,
    "router": RouterConfig,
    "elastic_train": ElasticTrainConfig,
    "quant": QuantConfig,
    "qad_train": QADConfig,
    "generation": GenerateConfig,
    "report": ReportConfig,
}


@cache
def register_schemas() -> None:
    """Store each group's dataclass as ``<group>/schema`` for YAML files to extend."""
    store = ConfigStore.instance()
    for group, node in SCHEMAS.items():
        store.store(group=group, name="schema", node=node)
