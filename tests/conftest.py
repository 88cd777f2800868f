"""Shared fixtures: a small real corpus (stdlib sources) and a single-process world."""

from __future__ import annotations

import os

import pytest

from megatron_ext.compat import ensure_compat

# Tests import megatron-core model modules directly, so the shims go in before collection.
ensure_compat()

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def data_overrides(tmp_path_factory) -> list[str]:
    """Hydra overrides for a small slice of the real stdlib corpus, prepared once per session."""
    cache = tmp_path_factory.mktemp("data")
    return [f"data.cache_dir={cache}", "data.max_files=60", "data.name=stdlib_small"]
