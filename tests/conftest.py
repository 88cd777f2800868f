"""Shared fixtures: a small real corpus (stdlib sources) and a single-process world."""

from __future__ import annotations

import os

import pytest

from megatron_ext.compat import ensure_compat
from megatron_ext.compat.engine import apply_engine_shims

# Tests import megatron-core model modules directly, so the shims go in before collection.
ensure_compat()
apply_engine_shims()

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def data_overrides(tmp_path_factory) -> list[str]:
    """Hydra overrides for a small slice of the real stdlib corpus, prepared once per session."""
    cache = tmp_path_factory.mktemp("data")
    return [f"data.cache_dir={cache}", "data.max_files=60", "data.name=stdlib_small"]


@pytest.fixture(scope="session")
def trained_parent(tmp_path_factory, data_overrides):
    """A tiny parent trained for 60 steps on the real corpus slice: (run dir, summary)."""
    from megatron_ext.config.compose import compose_recipe
    from recipes import train_parent

    run_dir = tmp_path_factory.mktemp("parent")
    overrides = [
        f"run.dir={run_dir}",
        *data_overrides,
        "train.micro_batch_size=4",
        "train.seq_length=64",
        "train.warmup_steps=2",
        "train.eval_batches=2",
        "train.log_interval=5",
        "train.steps=60",
        "train.eval_interval=20",
        "train.save_interval=30",
    ]
    return run_dir, train_parent.run(compose_recipe("train_parent", overrides))


@pytest.fixture(scope="session")
def importance_run(tmp_path_factory, trained_parent, data_overrides):
    """The trained parent, ranked and reordered by the importance recipe: its run dir."""
    from megatron_ext.config.compose import compose_recipe
    from recipes import importance

    parent_dir, _ = trained_parent
    run_dir = tmp_path_factory.mktemp("importance")
    overrides = [
        f"parent.dir={parent_dir}",
        f"run.dir={run_dir}",
        *data_overrides,
        "importance.calib_batches=4",
        "importance.seq_length=64",
    ]
    importance.run(compose_recipe("importance", overrides))
    return run_dir
