"""``train.init_from``: fine-tuning starts from another run's weights, of the same shape only."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_ext.checkpoint import CheckpointManager
from megatron_ext.config.compose import compose_recipe
from megatron_ext.models.builder import build_model
from megatron_ext.models.config import ConfigError, HybridModelConfig, load_model_config
from megatron_ext.parallel import ParallelConfig, init_distributed
from megatron_ext.training.init_from import check_same_shape, resolve_init_checkpoint
from recipes import train_parent


def test_another_model_shape_is_refused_naming_every_differing_field():
    base = HybridModelConfig()
    other = dataclasses.replace(base, name="x", hidden_size=64, ffn_hidden_size=128)
    with pytest.raises(ConfigError, match="train.init_from") as err:
        check_same_shape(base, other, "runs/p")
    assert "hidden_size" in str(err.value) and "ffn_hidden_size" in str(err.value)
    assert "name" not in str(err.value).split("(")[1]  # the name may differ
    check_same_shape(base, dataclasses.replace(base, name="renamed"), "runs/p")


def test_missing_source_is_a_config_error(tmp_path):
    pgs = init_distributed(ParallelConfig())
    with pytest.raises(ConfigError, match="train.init_from"):
        resolve_init_checkpoint(tmp_path, pgs)


def _weights(run_dir, pgs) -> dict[str, torch.Tensor]:
    cfg = load_model_config(run_dir)
    model = build_model(cfg, ParallelConfig(), pgs, initialize=False)
    ckpts = CheckpointManager(run_dir / "checkpoints", pgs)
    ckpts.load(ckpts.latest_valid(), model, weights_only=True)
    return {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def test_fine_tuning_starts_from_the_parent_weights(trained_parent, tmp_path):
    parent_dir, _ = trained_parent
    overrides = [
        f"run.dir={tmp_path}",
        "data=arithmetic",
        f"data.cache_dir={tmp_path / 'data'}",
        "data.arithmetic.train_examples=200",
        "data.arithmetic.valid_examples=20",
        "data.arithmetic.test_examples=10",
        f"train.init_from={parent_dir}",
        "train.steps=2",
        "train.warmup_steps=0",
        "train.micro_batch_size=2",
        "train.seq_length=32",
        "train.eval_batches=1",
        # a step this small leaves every weight where it started, to fp32 rounding
        "train.lr=1e-12",
        "train.min_lr=1e-12",
        "logger=none",
    ]
    summary = train_parent.run(compose_recipe("train_parent", overrides))
    assert summary["init_from"].endswith("iter_0000060")
    pgs = init_distributed(ParallelConfig())
    start, tuned = _weights(parent_dir, pgs), _weights(tmp_path, pgs)
    assert start.keys() == tuned.keys()
    for key, value in start.items():
        torch.testing.assert_close(tuned[key], value, rtol=0, atol=1e-8, msg=key)
